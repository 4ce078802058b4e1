"""Hostile output volumes: a multi-hundred-MB flood and an endless line cost bounded memory and disk.

Each capture runs in its own process and the test reads that process's peak RSS (wait4), so the
bound is on what the runner really holds, not on timing. The containers run the base OS image
(python3, no torch; scripts/make-base-os-image.sh) and are removed by the fixture.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from tests.e2e import BASE_ENV
from tests.helpers import collect, measured, spawn_measured
from tests.test_experiments import make_exp

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
# the runner's whole process: interpreter, docker SDK, one block of output (a capture measured ~33 MB,
# `infra logs` ~36 MB)
RSS_BOUND_MB = 100
# the volumes below are well above the bound (plus the interpreter): a process that held them could not
# stay under it, and above the 32 MiB kept-log limit and the engine's 2 × 32 MiB, so both rotate
FLOOD_MB = 150
LOG_MB = 150
LABELS = {"infra.test": "attack-logs"}


pytestmark = pytest.mark.slow


CAPTURE = """
import json, sys
from pathlib import Path
from runner import engine
from runner.run import logs
from runner.run.records import Experiment

mode, container_id, exp_dir = sys.argv[1:4]
container = engine.get_client().containers.get(container_id)
exp = Experiment(Path(exp_dir))
if mode == "live":
    logs.capture_container(exp, container)
else:
    logs.save_container_log(exp, container)
print(json.dumps({"ok": True}))
"""


@pytest.fixture
def os_image(docker_client):
    from runner import engine

    tag = BASE_ENV["INFRA_BASE_OS"]
    if engine.get_image_id(docker_client, tag) is None:
        message = f"image {tag} missing: build it with scripts/make-base-os-image.sh"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return tag


@pytest.fixture
def containers(docker_client):
    made = []
    yield made
    for container in made:
        try:
            container.remove(force=True)
        except Exception:  # already gone
            pass


def start(docker_client, image: str, program: str, made: list, limit: int):
    from runner.run import logs

    container = docker_client.containers.run(
        image, ["python3", "-c", program], detach=True, labels=LABELS, log_config=logs.docker_log_config(limit)
    )
    made.append(container)
    return container


def capture_in_process(mode: str, container, exp_dir: Path, limit: int, gate: bool = False) -> float:
    """Capture (live) or save in a fresh process; its peak RSS in MB. `gate`: the program waits for
    /tmp/go, which is made once this process has written the program's first line (it follows)."""
    probe, files = spawn_measured(
        [sys.executable, "-c", CAPTURE, mode, container.id, str(exp_dir)], env={"INFRA_LOG_LIMIT": str(limit)}
    )
    if gate:
        head = exp_dir / "container.log"
        deadline = time.monotonic() + 120
        while not (head.exists() and head.read_bytes().startswith(b"READY\n")):
            assert probe.poll() is None and time.monotonic() < deadline, "the capture never started following"
            time.sleep(0.05)
        container.exec_run(["touch", "/tmp/go"])
    code, out, err, rss = collect(probe, files)
    assert code == 0, err[-2000:]
    assert json.loads(out.splitlines()[-1]) == {"ok": True}
    return rss


def kept(exp_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in exp_dir.iterdir() if p.name.startswith("container.log")}


def read_all(exp_dir: Path, tail=None) -> list[str]:
    from runner.run import logs

    out: list[str] = []
    logs.read_log(exp_dir, out.append, tail=tail)
    return out


FLOOD = (
    "import os, sys, time\n"
    "print('READY', flush=True)\n"
    "while {gate} and not os.path.exists('/tmp/go'):\n"
    "    time.sleep(0.05)\n"
    "w = sys.stdout.write\n"
    "for block in range({mb} * 10):\n"
    "    w(''.join(f'{{block * 1000 + i:09d}} ' + 'x' * 90 + '\\n' for i in range(1000)))\n"
    "print('END OF FLOOD')\n"
)


@pytest.mark.docker
def test_flood_of_ordinary_lines_is_bounded(docker_client, os_image, containers, tmp_path):
    limit = 32 * MIB
    container = start(docker_client, os_image, FLOOD.format(mb=FLOOD_MB, gate=True), containers, limit)
    live = tmp_path / "live"
    live.mkdir()
    rss = capture_in_process("live", container, live, limit, gate=True)
    assert rss < RSS_BOUND_MB, f"live capture of {FLOOD_MB} MB held {rss:.0f} MB"
    files = kept(live)
    # head + tail parts; how many depends on how much the engine rotated away before it was read
    assert sum(files.values()) <= limit and files["container.log"] <= limit // 2 and len(files) <= 3, files
    lines = read_all(live)
    assert lines[:2] == ["READY", "000000000 " + "x" * 90] and lines[-1] == "END OF FLOOD"
    # the engine may already have rotated away output this follower had not read (it jumps there
    # without a marker); what the capture itself drops is marked
    gap = [i for i, line in enumerate(lines) if line.startswith("[infra:")]
    assert len(gap) <= 1 and all("bytes of output dropped here" in lines[i] for i in gap)
    numbers = [int(line.split()[0]) for line in lines[1:-1] if not line.startswith("[infra:")]
    assert numbers == sorted(numbers) and numbers[-1] == FLOOD_MB * 10_000 - 1  # in order, the end is there
    assert read_all(live, tail=2) == lines[-2:]

    # the engine's own copy is rotated at twice the limit (JSON framing), not a second unbounded log
    container.reload()
    log_path = Path(container.attrs["LogPath"])
    engine_bytes = sum(p.stat().st_size for p in log_path.parent.glob(log_path.name + "*"))
    assert engine_bytes <= 2 * limit + MIB, engine_bytes

    # `infra status` after a detached run saves the log from the engine: streamed, bounded too
    saved = make_exp(tmp_path / "detached", state="running", backend="docker").root
    rss = capture_in_process("save", container, saved, limit)
    assert rss < RSS_BOUND_MB, f"saving the engine's log held {rss:.0f} MB"
    assert sum(kept(saved).values()) <= limit
    assert read_all(saved, tail=1) == ["END OF FLOOD"]


@pytest.mark.docker
def test_endless_line_without_newline_is_cut_in_linear_time(docker_client, os_image, containers, tmp_path):
    limit = 128 * MIB  # the engine's two files then hold the whole line, so the count below is exact
    program = "import sys\nfor _ in range(48):\n    sys.stdout.write('y' * (1 << 20))\n"  # 48 MiB, no newline
    container = start(docker_client, os_image, program, containers, limit)
    for mode in ("live", "save"):
        exp = tmp_path / mode
        exp.mkdir()
        rss = capture_in_process(mode, container, exp, limit)
        assert rss < RSS_BOUND_MB, f"{mode}: one 48 MiB line held {rss:.0f} MB"
        (line,) = read_all(exp)
        assert line == "y" * (64 << 10) + f" … [infra: line truncated, {(48 << 20) - (64 << 10)} bytes dropped]"
        assert sum(kept(exp).values()) < 70_000


def test_logs_tail_1_on_a_150_mb_log_reads_from_the_end(tmp_path):
    exp = make_exp(tmp_path, state="succeeded")
    block = b"".join(b"%09d " % i + b"x" * 90 + b"\n" for i in range(10_000))
    with open(exp.root / "container.log", "wb") as fh:  # e.g. written before logs were bounded
        for _ in range(LOG_MB):
            fh.write(block)
        fh.write(b"the last line\n")
    cli = [sys.executable, "-m", "runner", "logs", exp.id, "--workdir", str(tmp_path)]
    code, out, err, rss = measured([*cli, "--tail", "1"])
    assert code == 0, err
    assert out == "the last line\n"
    assert rss < RSS_BOUND_MB, f"infra logs --tail 1 held {rss:.0f} MB"
    code, out, err, rss = measured([*cli, "--tail", "3"])
    assert out.splitlines()[-1] == "the last line" and len(out.splitlines()) == 3
    # the whole log streams through in bounded memory too
    code, out, err, rss = measured([*cli])
    assert code == 0 and rss < RSS_BOUND_MB and out.endswith("the last line\n"), err
    code, out, err, rss = measured([sys.executable, "-m", "runner", "status", exp.id, "--workdir", str(tmp_path)])
    assert code == 0 and rss < RSS_BOUND_MB


@pytest.mark.docker
def test_late_follower_gets_every_line_once(docker_client, os_image, containers):
    from runner import engine

    container = start(docker_client, os_image, FLOOD.format(mb=20, gate=False), containers, 128 * MIB)
    engine.wait(container)  # the engine ends a follow at the exit: the rest must still arrive
    seen: list[str] = []
    engine.stream_logs(container, seen.append, follow=True)
    assert seen[0] == "READY" and seen[-1] == "END OF FLOOD"
    assert [int(line.split()[0]) for line in seen[1:-1]] == list(range(200_000))


@pytest.mark.docker
def test_logs_follow_tail_repeats_nothing(docker_client, os_image, containers, tmp_path):
    from runner.run.logs import follow_logs
    from runner.run.spec import LABEL_ATTEMPT, LABEL_EXPERIMENT, LABEL_WORKDIR, workdir_identity

    exp = make_exp(tmp_path, state="running", backend="docker")
    program = (
        "import sys, time\n"
        "for i in range(10): print(i, flush=True)\n"
        "time.sleep(3)\n"
        "for i in range(10, 15): print(i, flush=True)\n"
    )
    container = docker_client.containers.run(
        os_image,
        ["python3", "-c", program],
        detach=True,
        labels={
            **LABELS,
            LABEL_EXPERIMENT: exp.id,
            LABEL_ATTEMPT: "1",
            LABEL_WORKDIR: workdir_identity(exp.root.parent.parent),
        },
    )
    containers.append(container)
    deadline = time.monotonic() + 60
    while b"9\n" not in container.logs() and time.monotonic() < deadline:
        time.sleep(0.1)
    seen: list[str] = []
    follow_logs(exp, seen.append, follow=True, tail=3)
    assert seen == [str(i) for i in range(7, 15)]
