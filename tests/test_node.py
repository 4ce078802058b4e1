"""`infra node`: this machine's real resources; NVML and Docker absent or present, never a crash."""

from __future__ import annotations

import json
import os
import sys
import types

import pytest

from tests.helpers import cli


def test_node_json_reports_this_machine(tmp_path):
    result = cli("node", "--json", workdir=tmp_path)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["cpus"] == os.cpu_count()
    assert doc["memory"]["total_bytes"] > doc["memory"]["available_bytes"] > 0
    assert doc["disk"]["path"] == str(tmp_path) and doc["disk"]["free_bytes"] > 0
    assert isinstance(doc["gpus"], list)
    if not doc["gpus"]:
        assert doc["gpu_note"]
    docker = doc["docker"]
    assert docker["reachable"] in (True, False)
    if docker["reachable"]:
        assert docker["server_version"] and isinstance(docker["gpu_runtime"], bool)
    else:
        assert "Docker" in docker["error"]


def test_node_human_output(tmp_path):
    result = cli("node", workdir=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("host ") and "cpus" in result.stdout and "docker" in result.stdout


def test_unreachable_docker_is_reported_not_raised(monkeypatch):
    from runner.node import docker_info

    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    doc = docker_info()
    assert doc["reachable"] is False and "not reachable" in doc["error"]


def test_nvml_absent_gives_empty_list_and_note(monkeypatch):
    from runner.node import gpu_info

    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails as if the extra were not installed
    gpus, note = gpu_info()
    assert gpus == [] and "gpu" in note


def test_nvml_driver_missing_gives_note(monkeypatch):
    from runner.node import gpu_info

    def fail():
        raise RuntimeError("NVML Shared Library Not Found")

    monkeypatch.setitem(sys.modules, "pynvml", types.SimpleNamespace(nvmlInit=fail))
    gpus, note = gpu_info()
    assert gpus == [] and "NVIDIA driver" in note


@pytest.mark.gpu
def test_nvml_lists_real_gpus():
    pytest.importorskip("pynvml")
    from runner.node import gpu_info

    gpus, note = gpu_info()
    assert gpus, note
    assert gpus[0]["memory_total_bytes"] > 0 and gpus[0]["name"]
