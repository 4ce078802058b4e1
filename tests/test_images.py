"""Unit tests of the pure image builders and engine argument builders (no Docker engine)."""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

import pytest

import runner
from runner import engine
from runner.images import builds
from runner.images.builds import Entry, IgnoreRules

REPO = Path(__file__).resolve().parent.parent


def make_workdir(root: Path) -> Path:
    (root / "model").mkdir(parents=True)
    (root / "model" / "__init__.py").write_text("from . import tiny\n")
    (root / "model" / "tiny.py").write_text("X = 1\n")
    (root / "embed").mkdir()
    (root / "embed" / "e.py").write_text("Y = 2\n")
    (root / "experiments" / "old").mkdir(parents=True)
    (root / "experiments" / "old" / "big.bin").write_bytes(b"\0" * 100)
    (root / "notes.txt").write_text("not a plugin\n")
    return root


def names(entries) -> list[str]:
    return sorted(e.arcname + ("/" if e.is_dir else "") for e in entries)


# --- .dockerignore ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rules", "path", "excluded"),
    [
        ("*.pyc", "a.pyc", True),
        ("*.pyc", "sub/a.pyc", False),  # '*' does not cross '/': docker semantics
        ("**/*.pyc", "sub/deep/a.pyc", True),
        ("**/*.pyc", "a.pyc", True),
        ("data", "data/x/y.csv", True),  # a match on a parent excludes the contents
        ("data\n!data/keep.csv", "data/keep.csv", False),
        ("data\n!data/keep.csv", "data/drop.csv", True),
        ("/model/scratch?", "model/scratch1", True),
        ("# comment\n\n", "anything", False),
        ("model/[ab].py", "model/a.py", True),
        ("model/[!ab].py", "model/a.py", False),
    ],
)
def test_dockerignore_semantics(rules, path, excluded):
    assert IgnoreRules.parse(rules).excluded(path) is excluded


# --- deterministic contexts -----------------------------------------------------------------------


def test_context_tar_is_reproducible_and_normalised(tmp_path):
    wd = make_workdir(tmp_path / "wd")
    (wd / "model" / "run.sh").write_text("#!/bin/sh\n")
    (wd / "model" / "run.sh").chmod(0o700)
    first = builds.context_tar_bytes(builds.plugin_context_entries(wd))
    # Touching files (new mtimes) and re-listing in another order changes nothing.
    for p in (wd / "model").iterdir():
        p.touch()
    second = builds.context_tar_bytes(reversed(builds.plugin_context_entries(wd)))
    assert first == second
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted(m.name for m in members)
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" for m in members)
    modes = {m.name: m.mode for m in members}
    assert modes["workdir/model/run.sh"] == 0o755
    assert modes["workdir/model/tiny.py"] == 0o644
    assert modes["workdir/model"] == 0o755


def test_plugin_context_layout(tmp_path):
    wd = make_workdir(tmp_path / "wd")
    got = names(builds.plugin_context_entries(wd))
    assert got == sorted(
        [
            "Dockerfile",
            "requirements.txt",
            "wheels/",
            "workdir/",
            "workdir/model/",
            "workdir/model/__init__.py",
            "workdir/model/tiny.py",
            "workdir/embed/",
            "workdir/embed/e.py",
            "workdir/metrics/",
            "workdir/vocab/",  # missing folders become empty dirs
        ]
    )  # experiments/ and stray files never enter the context


def test_plugin_context_honours_dockerignore_and_skips_bytecode(tmp_path):
    wd = make_workdir(tmp_path / "wd")
    (wd / "model" / "__pycache__").mkdir()
    (wd / "model" / "__pycache__" / "tiny.cpython-311.pyc").write_bytes(b"x")
    (wd / "model" / "weights.ckpt").write_bytes(b"x")
    (wd / ".dockerignore").write_text("**/*.ckpt\nembed\n")
    got = names(builds.plugin_context_entries(wd))
    assert "workdir/model/weights.ckpt" not in got
    assert not any("__pycache__" in n for n in got)
    assert "workdir/embed/e.py" not in got and "workdir/embed/" in got


def test_requirements_and_wheels_enter_the_context_only_when_needed(tmp_path):
    wd = make_workdir(tmp_path / "wd")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "tiny-1.0-py3-none-any.whl").write_bytes(b"PK")
    assert "wheels/tiny-1.0-py3-none-any.whl" not in names(builds.plugin_context_entries(wd, wheels))
    (wd / "requirements.txt").write_text("tiny==1.0\n")
    entries = builds.plugin_context_entries(wd, wheels)
    assert "wheels/tiny-1.0-py3-none-any.whl" in names(entries)
    assert next(e for e in entries if e.arcname == "requirements.txt").data == b"tiny==1.0\n"


# --- content hashes and tags ----------------------------------------------------------------------


def test_plugin_tag_follows_plugin_content_and_base_id(tmp_path):
    wd = make_workdir(tmp_path / "wd")
    spec = builds.plan_plugin_build(wd, "infra-base:x", "sha256:aaa")
    assert re.fullmatch(r"infra-plugins:[0-9a-f]{12}", spec.tag)
    assert spec.tag == f"infra-plugins:{spec.content_hash[:12]}"
    # Unchanged workdir (even touched, or with experiments added) → same tag.
    (wd / "model" / "tiny.py").touch()
    (wd / "experiments" / "new").mkdir()
    assert builds.plan_plugin_build(wd, "infra-base:x", "sha256:aaa").tag == spec.tag
    # Another base image id or a plugin edit → another tag.
    assert builds.plan_plugin_build(wd, "infra-base:x", "sha256:bbb").tag != spec.tag
    (wd / "model" / "tiny.py").write_text("X = 2\n")
    assert builds.plan_plugin_build(wd, "infra-base:x", "sha256:aaa").tag != spec.tag


def test_plugin_labels_and_args(tmp_path):
    wd = make_workdir(tmp_path / "wd")
    spec = builds.plan_plugin_build(wd, "infra-base:abc", "sha256:aaa")
    assert spec.buildargs == {"BASE": "infra-base:abc"}
    assert spec.labels == {
        "infra.kind": "plugins",
        "infra.version": runner.__version__,
        "infra.content_hash": spec.content_hash,
        "infra.core_api": str(builds.CORE_API),
        "infra.base_image": "sha256:aaa",
    }
    assert spec.describe()["context"][0] == "Dockerfile"


def test_stat_fingerprint_does_not_read_content(tmp_path):
    big = tmp_path / "w.whl"
    big.write_bytes(b"a" * 10)
    e = Entry("wheelhouse/w.whl", source=big, fingerprint="stat")
    assert e.digest() == "size:10"


def test_base_plan_hashes_source_args_and_wheels(tmp_path):
    spec = builds.plan_base_build(REPO)
    assert re.fullmatch(r"infra-base:[0-9a-f]{12}", spec.tag)
    assert spec.dockerfile == "images/base/Dockerfile"
    context = spec.describe()["context"]
    assert {"pyproject.toml", "README.md", "runner/", "runner/__init__.py", "images/base/Dockerfile"} <= set(context)
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in context)
    assert spec.labels["infra.kind"] == "base"
    cpu = builds.plan_base_build(REPO, base_image="infra-os:bookworm", torch_spec="torch==2.13.0")
    assert cpu.tag != spec.tag
    assert cpu.buildargs == {
        "INFRA_VERSION": runner.__version__,
        "BASE_IMAGE": "infra-os:bookworm",
        "TORCH_SPEC": "torch==2.13.0",
    }
    wheels = tmp_path / "wh"
    wheels.mkdir()
    (wheels / "x-1-py3-none-any.whl").write_bytes(b"PK")
    with_wheels = builds.plan_base_build(REPO, wheelhouse=wheels)
    assert "wheelhouse/x-1-py3-none-any.whl" in with_wheels.describe()["context"]
    assert with_wheels.tag != spec.tag


def test_plugin_dockerfile_file_matches_rendered():
    assert (REPO / "images/plugins/Dockerfile").read_text() == builds.render_plugin_dockerfile()


def test_dockerfiles_build_with_the_classic_builder():
    for path in ("images/base/Dockerfile", "images/plugins/Dockerfile"):
        text = (REPO / path).read_text()
        assert not re.search(r"^RUN\s+--mount", text, re.M), (
            f"{path}: RUN --mount needs BuildKit; the SDK uses the classic builder"
        )


def test_dockerfile_args_cover_the_build_args():
    base_args = set(re.findall(r"^ARG (\w+)", (REPO / "images/base/Dockerfile").read_text(), re.M))
    assert set(builds.base_build_args("x", "torch", "1")) <= base_args
    plugin_args = set(re.findall(r"^ARG (\w+)", builds.render_plugin_dockerfile(), re.M))
    assert set(builds.plugin_build_args("b")) == plugin_args


def test_context_cli_writes_the_plugin_context(tmp_path):
    wd = make_workdir(tmp_path / "wd")
    out = tmp_path / "ctx"
    assert builds.main(["context", str(wd), str(out)]) == 0
    assert (out / "Dockerfile").read_text() == builds.render_plugin_dockerfile()
    assert (out / "workdir/model/tiny.py").read_text() == "X = 1\n"
    assert (out / "workdir/vocab").is_dir() and (out / "requirements.txt").exists()


# --- engine argument builders ---------------------------------------------------------------------


@pytest.mark.parametrize("spec", [None, "none", 0, "", "0"])
def test_no_gpus(spec):
    assert engine.device_requests(spec) is None


def test_gpu_specs():
    (all_,) = engine.device_requests("all")
    assert all_["Count"] == -1 and all_["Capabilities"] == [["gpu"]]
    (two,) = engine.device_requests(2)
    assert two["Count"] == 2
    (ids,) = engine.device_requests("0,2")
    assert ids["DeviceIDs"] == ["0", "2"]
    for bad in ("many", "0,x", -5, True):
        with pytest.raises(ValueError, match="GPU"):
            engine.device_requests(bad)


def test_container_args():
    args = engine.container_args(
        "infra-plugins:abc",
        ["infra-train", "/exp/config/plan.json"],
        name="exp-1",
        labels={"infra.experiment_id": "exp-1"},
        mounts=[("/data/db.sqlite", "/data/db.sqlite", "ro"), ("/wd/experiments/exp-1", "/exp", "rw")],
        user="1000:1000",
        environment={"HOME": "/tmp/home"},
        shm_size="2g",
        gpus="all",
    )
    assert args["volumes"] == {
        "/data/db.sqlite": {"bind": "/data/db.sqlite", "mode": "ro"},
        "/wd/experiments/exp-1": {"bind": "/exp", "mode": "rw"},
    }
    assert args["user"] == "1000:1000" and args["network_mode"] == "none" and args["privileged"] is False
    assert args["init"] is True and args["detach"] is True
    assert args["device_requests"][0]["Count"] == -1
    assert "mem_limit" not in args and "nano_cpus" not in args
    with pytest.raises(ValueError, match="mode"):
        engine.container_args("i", None, mounts=[("/a", "/b", "rwx")])


def test_importing_the_image_modules_loads_neither_docker_nor_torch():
    import subprocess
    import sys

    code = "import sys, runner.engine, runner.images.builds; print(sorted({'docker', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unreachable_engine_is_an_environment_problem():
    from runner.errors import EnvironmentProblem

    with pytest.raises(EnvironmentProblem, match="not reachable.*docker.io") as err:
        engine.get_client("unix:///nonexistent/docker.sock", timeout=2)
    assert err.value.exit_code == 3
