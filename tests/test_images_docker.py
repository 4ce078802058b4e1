"""Image builds and containers against the real Docker engine (marker `docker`).

The CPU base image is built once from this checkout (infra-os:bookworm + wheelhouse/, see
scripts/make-base-os-image.sh and scripts/make-wheelhouse.sh) and kept: it is the slow part and the
engine's cache is what CI reuses. Every plugin image and container a test makes is removed.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from runner import engine
from runner.errors import BuildError, EnvironmentProblem
from runner.images import builds

pytestmark = pytest.mark.docker
REPO = Path(__file__).resolve().parent.parent
TEST_LABEL = {"infra.test": "test_images_docker"}


@pytest.fixture(scope="session")
def base_image(docker_client):
    """The CPU base image of this checkout (built when missing; kept afterwards)."""
    if not engine.image_exists(docker_client, builds.CPU_BASE_ARGS["BASE_IMAGE"]):
        pytest.fail("infra-os:bookworm missing: run 'bash scripts/make-base-os-image.sh' (and make-wheelhouse.sh)")
    return builds.ensure_base_image(
        docker_client,
        base_image=builds.CPU_BASE_ARGS["BASE_IMAGE"],
        torch_spec=builds.CPU_BASE_ARGS["TORCH_SPEC"],
    )


@pytest.fixture
def made(docker_client):
    """Hygiene: register tags/containers a test makes; all are removed afterwards."""
    tags: list[str] = []
    yield tags
    for container in engine.find_containers(docker_client, TEST_LABEL):
        engine.remove_container(container)
    for tag in tags:
        engine.remove_image(docker_client, tag, force=True)


@pytest.fixture
def workdir(tmp_path):
    wd = tmp_path / "wd"
    (wd / "model").mkdir(parents=True)
    (wd / "model" / "__init__.py").write_text("")
    (wd / "model" / "tiny.py").write_text(f"MARK = {time.time_ns()}\n")  # unique per test run
    (wd / "metrics").mkdir()
    (wd / "metrics" / "m.py").write_text("Z = 3\n")
    return wd


def layers(client, tag: str) -> list[str]:
    return client.api.inspect_image(tag)["RootFS"]["Layers"]


def run(client, image: str, code: str, **kwargs) -> tuple[int, str]:
    container = engine.run_container(client, image, ["python", "-c", code], labels=TEST_LABEL, **kwargs)
    try:
        code_ = engine.wait(container, timeout=120)
        return code_, engine.log_tail(container, 200)
    finally:
        engine.remove_container(container)


def test_base_image_has_the_core_and_labels(docker_client, base_image):
    labels = engine.image_labels(docker_client, base_image.tag)
    assert labels["infra.kind"] == "base"
    assert labels["infra.content_hash"] == base_image.content_hash
    # Asked again for an unchanged checkout: decided without building, quickly. (The first call
    # only rebuilds when the tree changed since the fixture ran, e.g. while editing runner/.)
    cpu = {k.lower(): v for k, v in builds.CPU_BASE_ARGS.items()}
    first = builds.ensure_base_image(docker_client, **cpu)
    start = time.perf_counter()
    again = builds.ensure_base_image(docker_client, **cpu)
    assert time.perf_counter() - start < 2.0
    assert not again.built and again.id == first.id


def test_plugin_build_reuse_and_top_layer_rebuild(docker_client, base_image, workdir, made):
    logs: list[str] = []
    first = builds.ensure_plugin_image(docker_client, workdir, base_image.tag, logs.append)
    made.append(first.tag)
    assert first.built and first.tag.startswith("infra-plugins:")
    assert any(line.startswith("Step ") for line in logs)
    labels = engine.image_labels(docker_client, first.tag)
    assert labels["infra.kind"] == "plugins" and labels["infra.content_hash"] == first.content_hash
    assert labels["infra.base_image"] == base_image.id

    # Unchanged workdir: no rebuild, decided within the 0.5 s target.
    start = time.perf_counter()
    again = builds.ensure_plugin_image(docker_client, workdir, base_image.tag)
    assert time.perf_counter() - start < 0.5
    assert not again.built and again.id == first.id

    # A plugin edit rebuilds only the top (plugin files) layer; everything below is shared.
    (workdir / "model" / "tiny.py").write_text("MARK = 'edited'\n")
    edited = builds.ensure_plugin_image(docker_client, workdir, base_image.tag)
    made.append(edited.tag)
    assert edited.built and edited.tag != first.tag
    old, new = layers(docker_client, first.tag), layers(docker_client, edited.tag)
    assert len(old) == len(new)
    assert old[:-1] == new[:-1] and old[-1] != new[-1]

    # The container runs as an arbitrary uid with a writable HOME and sees the plugins and the core.
    code, out = run(
        docker_client,
        edited.tag,
        "import os, torch, lightning, pandas, runner; from pathlib import Path; "
        "Path(os.environ['HOME'], 'probe').write_text('ok'); "
        "print('uid', os.getuid(), os.environ['INFRA_WORKDIR'], Path('/workdir/model/tiny.py').read_text().strip())",
        user="12345:12345",
    )
    assert code == 0, out
    assert "uid 12345 /workdir MARK = 'edited'" in out


def test_build_failure_reports_step_and_log_tail(docker_client, base_image, workdir, made, tmp_path):
    (workdir / "requirements.txt").write_text("definitely-not-a-real-package-infra==9.9\n")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    # Any wheel makes the install offline (fails fast instead of waiting on an index); pip reads
    # only the names of wheels it does not pick.
    (wheels / "placeholder-0.0-py3-none-any.whl").write_bytes(b"PK")
    spec = builds.plan_plugin_build(workdir, base_image.tag, base_image.id, wheels)
    made.append(spec.tag)
    with pytest.raises(BuildError) as err:
        builds.ensure_plugin_image(docker_client, workdir, base_image.tag, wheelhouse=wheels)
    assert err.value.exit_code == 3
    assert err.value.step.startswith("Step ") and "RUN" in err.value.step
    assert "definitely-not-a-real-package-infra" in err.value.log_tail
    assert spec.tag in str(err.value) and "failed at" in str(err.value)
    assert not engine.image_exists(docker_client, spec.tag)


def test_missing_base_image_says_what_to_do(docker_client, workdir):
    with pytest.raises(EnvironmentProblem, match=r"infra build --base"):
        builds.ensure_plugin_image(docker_client, workdir, "infra-base:does-not-exist")


def test_gpu_request_without_runtime_leaves_nothing(docker_client, base_image, made):
    if engine.gpu_runtime_available(docker_client):
        pytest.skip("this engine has the NVIDIA runtime")
    with pytest.raises(EnvironmentProblem, match="NVIDIA Container Toolkit") as err:
        engine.run_container(docker_client, base_image.tag, ["true"], labels=TEST_LABEL, gpus="all")
    assert err.value.exit_code == 3
    assert engine.find_containers(docker_client, TEST_LABEL) == []


def test_container_lifecycle_helpers(docker_client, base_image, made):
    container = engine.run_container(
        docker_client, base_image.tag, ["sh", "-c", "echo one; echo two >&2; sleep 60"], labels=TEST_LABEL
    )
    assert [c.id for c in engine.find_containers(docker_client, TEST_LABEL)] == [container.id]
    engine.stop(container, timeout=1)
    assert engine.wait(container) != 0
    lines: list[str] = []
    engine.stream_logs(container, lines.append)
    assert sorted(lines) == ["one", "two"]  # stdout and stderr are separate streams
    assert engine.container_state(container)["status"] == "exited"
    engine.remove_container(container)
    engine.remove_container(container)  # twice is fine
    assert engine.find_containers(docker_client, TEST_LABEL) == []


def buildkit_cli() -> str | None:
    """A docker CLI that builds with BuildKit without buildx (Debian's 20.10), if present."""
    cli = "/usr/bin/docker"
    if not os.access(cli, os.X_OK):
        return None
    out = subprocess.run([cli, "version", "--format", "{{.Client.Version}}"], capture_output=True, text=True)
    return cli if out.returncode == 0 and out.stdout.startswith("20.") else None


def test_plugin_dockerfile_builds_with_buildkit(docker_client, base_image, workdir, made, tmp_path):
    cli = buildkit_cli()
    if cli is None:
        pytest.skip("no BuildKit-capable docker CLI without buildx (Debian's docker.io 20.10)")
    spec = builds.plan_plugin_build(workdir, base_image.tag, base_image.id)
    tag = spec.tag.replace("infra-plugins:", "infra-plugins-buildkit:")
    made.append(tag)
    context = tmp_path / "ctx.tar"
    context.write_bytes(builds.context_tar_bytes(spec.entries))
    args = [cli, "build", "-q", "-t", tag, "--build-arg", f"BASE={base_image.tag}", "-"]
    with open(context, "rb") as fh:
        out = subprocess.run(args, stdin=fh, capture_output=True, text=True, env={**os.environ, "DOCKER_BUILDKIT": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    code, logs = run(docker_client, tag, "import pathlib; print(pathlib.Path('/workdir/metrics/m.py').read_text())")
    assert code == 0 and "Z = 3" in logs
