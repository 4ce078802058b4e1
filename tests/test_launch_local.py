"""The local backend's pre-flight: a Python without the training core gets a clear exit-3 message."""

from __future__ import annotations

import importlib.util
import json

import pytest

from runner.errors import EnvironmentProblem
from runner.plan.load import load_plan
from runner.plan.models import GpuRequest
from runner.run import launch
from runner.run.backends import backend_for, local


@pytest.mark.core
def test_local_backend_without_core_is_environment_error(tmp_path, mini_db, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(local.importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    loaded = load_plan("p", text=json.dumps({"name": "x", "data": {"db": str(mini_db)}, "model": {"name": "linear"}}))
    with pytest.raises(EnvironmentProblem) as info:
        launch.run(loaded, tmp_path, launch.RunOptions(backend=backend_for("local")))
    assert info.value.exit_code == 3
    assert info.value.message == (
        "--backend local runs the training core in this Python, which lacks torch: "
        "install it with \"pip install 'infra[core]'\" (or use the docker backend)"
    )
    assert not list((tmp_path / "experiments").glob("*/status.json"))  # nothing created


@pytest.mark.parametrize("bad", ["abc", "0,,1", "-1", "all,0"])
def test_bad_gpus_flag_is_a_usage_error(bad):
    from runner.errors import UsageError

    with pytest.raises(UsageError) as info:
        GpuRequest.parse(bad)
    assert info.value.exit_code == 2
    assert info.value.message == f"--gpus {bad!r}: use all, none, a GPU count or a device list like 0,2"


@pytest.mark.parametrize(
    ("plan", "flag", "expected"),
    [("none", None, "none"), ("all", "2", "2"), (1, None, "1"), ("none", "0,2", "0,2"), ("all", "none", "none")],
)
def test_gpus_flag_overrides_plan(plan, flag, expected, mini_db):
    text = json.dumps({"name": "x", "data": {"db": str(mini_db)}, "model": {"name": "linear"}, "resources.gpus": plan})
    loaded = load_plan("p", text=text)
    flag = None if flag is None else GpuRequest.parse(flag)
    assert launch.plan_gpus(loaded, flag).text() == expected


def test_gpu_request_is_parsed_once_into_its_kind():
    assert GpuRequest.parse("2") == GpuRequest(kind="count", count=2)
    assert GpuRequest.parse("0,2").devices == (0, 2) and GpuRequest.parse("0,2").engine_value() == "0,2"
    assert GpuRequest.parse("1", devices_only=True) == GpuRequest(kind="devices", devices=(1,))
    assert (
        GpuRequest.parse("all").cuda_visible_devices() is None and GpuRequest.parse(None).cuda_visible_devices() == ""
    )
    assert [g.text() for g in GpuRequest.parse("0,1").split(2)] == ["0", "1"]
    with pytest.raises(Exception, match="listed twice"):
        GpuRequest.parse("0,0")
