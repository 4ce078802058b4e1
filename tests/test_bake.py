"""docker-bake.hcl builds what the runner builds: same Dockerfiles, same build args, same defaults."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import runner
from runner.images import builds

hcl2 = pytest.importorskip("hcl2")
REPO = Path(__file__).resolve().parent.parent


def _unquote(value):
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


@pytest.fixture(scope="module")
def bake():
    """{"variables": {name: default}, "targets": {name: block}} with quotes stripped and variable
    references resolved to their defaults (python-hcl2 keeps both as raw text)."""
    with open(REPO / "docker-bake.hcl") as fh:
        doc = hcl2.load(fh)
    variables = {}
    for block in doc.get("variable", []):
        for name, body in block.items():
            variables[_unquote(name)] = _unquote(body.get("default"))

    def resolve(value):
        if isinstance(value, dict):
            return {_unquote(k): resolve(v) for k, v in value.items() if k != "__is_block__"}
        if isinstance(value, list):
            return [resolve(v) for v in value]
        raw = _unquote(value)
        if raw == value and isinstance(value, str) and value in variables:
            return variables[value]
        return raw

    targets = {}
    for block in doc.get("target", []):
        for name, body in block.items():
            targets[_unquote(name)] = resolve(body)
    for name, body in list(targets.items()):  # apply `inherits` like bake does (maps merge)
        for parent in body.get("inherits", []):
            merged = {**targets[parent]}
            for key, value in body.items():
                merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
            targets[name] = merged
    return {"variables": variables, "targets": targets}


def dockerfile_args(path: Path) -> set[str]:
    return set(re.findall(r"^ARG (\w+)", path.read_text(), re.M))


def test_targets_exist(bake):
    assert {"base", "base-cpu", "plugins"} <= set(bake["targets"])


def test_base_target_matches_the_runner(bake):
    base = bake["targets"]["base"]
    spec = builds.plan_base_build(REPO)
    assert base["context"] == "."
    assert base["dockerfile"] == spec.dockerfile == builds.BASE_DOCKERFILE
    assert (REPO / base["dockerfile"]).is_file()
    assert set(base["args"]) <= dockerfile_args(REPO / base["dockerfile"])
    # The runner's CUDA default is the Dockerfile's ARG default; bake passes the same value.
    default = re.search(r"^ARG BASE_IMAGE=(\S+)", (REPO / base["dockerfile"]).read_text(), re.M).group(1)
    assert base["args"]["BASE_IMAGE"] == default
    assert base["args"]["INFRA_VERSION"] == spec.buildargs["INFRA_VERSION"] == runner.__version__
    assert base["labels"]["infra.kind"] == spec.labels["infra.kind"] == "base"
    assert base["labels"]["infra.core_api"] == spec.labels["infra.core_api"] == str(builds.CORE_API)


def test_cpu_target_matches_the_runner_cpu_args(bake):
    cpu = bake["targets"]["base-cpu"]
    spec = builds.plan_base_build(
        REPO, base_image=builds.CPU_BASE_ARGS["BASE_IMAGE"], torch_spec=builds.CPU_BASE_ARGS["TORCH_SPEC"]
    )
    assert cpu["dockerfile"] == spec.dockerfile
    assert cpu["args"] == spec.buildargs
    assert set(cpu["args"]) <= dockerfile_args(REPO / cpu["dockerfile"])


def test_plugins_target_matches_the_runner(bake, tmp_path):
    plugins = bake["targets"]["plugins"]
    spec = builds.plan_plugin_build(tmp_path, "infra-base:x", "sha256:x")
    assert plugins["dockerfile"] == spec.dockerfile == "Dockerfile"
    assert set(plugins["args"]) == set(spec.buildargs) == dockerfile_args(REPO / builds.PLUGIN_DOCKERFILE)
    assert plugins["labels"]["infra.kind"] == spec.labels["infra.kind"] == "plugins"
    assert plugins["labels"]["infra.version"] == runner.__version__
    assert plugins["labels"]["infra.core_api"] == spec.labels["infra.core_api"] == str(builds.CORE_API)
