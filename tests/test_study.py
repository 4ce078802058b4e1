"""Studies through long-lived slots (`--backend local`: real core processes, real Lightning trainings).

Every moment a test acts at is held by the gate model (tests/gate_model.py) until the test opens
it; nothing waits on the clock except generous deadlines for events that must come.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from pathlib import Path

import pytest

from tests.e2e import wait_for
from tests.helpers import gate_workdir, infra, infra_background

pytestmark = [pytest.mark.core, pytest.mark.slow]

MODELS = '[{"name":"ridge"},{"name":"mlp"},{"name":"gate","params":{"fail":"raise"}},{"name":"gate","params":{"fail":"kill"}},{"name":"mlp","params":{"hidden":16}}]'


@pytest.fixture
def swork(tmp_path) -> Path:
    """A workdir from the template with the demo database (BLAT) and the gate model."""
    return gate_workdir(tmp_path / "work")


def plan_file(work: Path, name: str = "study", **train) -> Path:
    doc = {
        "name": name,
        "data": {"db": "data/blat.db", "limit": 400},
        "model": {"name": "linear"},
        "train": {"max_epochs": 2, "batch_size": 64, **train},
        # one thread: the same as the point run alone (equal thread counts give equal bits)
        "resources": {"cpus": 1},
    }
    path = work / "plans" / f"{name}.json"
    path.write_text(json.dumps(doc))
    return path


def sweep(work: Path, plan: Path, *args: str, env: dict | None = None) -> tuple[int, dict, str]:
    result = infra("run", str(plan), "--backend", "local", "--json", *args, workdir=work, env=env, timeout=900)
    return result.returncode, json.loads(result.stdout or "{}"), result.stderr


def record(exp_dir: str | Path) -> dict:
    return json.loads((Path(exp_dir) / "status.json").read_text())


def slot_pids(work: Path) -> set[int]:
    """The slot processes (pids, from the points' records) of this workdir's studies."""
    pids = set()
    for status in (work / "experiments").glob("*/status.json"):
        slot = json.loads(status.read_text()).get("slot") or {}
        if str(slot.get("process", "")).isdigit():
            pids.add(int(slot["process"]))
    return pids


def alive(pids: set[int]) -> set[int]:
    """Those of `pids` still running as a study slot (a reused pid running something else does not count)."""
    running = set()
    for pid in pids:
        try:
            if b"runner.core.slot" in Path(f"/proc/{pid}/cmdline").read_bytes():
                running.add(pid)
        except OSError:
            continue
    return running


def test_points_fail_alone_and_a_killed_slot_takes_only_its_point(swork):
    """ridge, mlp, a point that raises, a point that kills its process (SIGKILL, as the OOM killer
    does), mlp again: the failures stay with their points, the last point runs in a fresh slot."""
    code, doc, err = sweep(swork, plan_file(swork), "--sweep", f"model={MODELS}")
    assert code == 1, err
    points = doc["experiments"]
    assert [p["state"] for p in points] == ["succeeded", "succeeded", "failed", "failed", "succeeded"]
    raised, killed = points[2], points[3]
    assert raised["exit_code"] == 1
    assert "RuntimeError: gate: failing on purpose" in (Path(raised["exp_dir"]) / "container.log").read_text()
    assert killed["message"] == "the study slot's process ended: killed (SIGKILL: out of memory or killed by hand)"
    assert record(killed["exp_dir"])["exit_code"] == 137
    slots = [record(p["exp_dir"])["slot"]["name"] for p in points]
    assert slots[0] == slots[1] == slots[2] == slots[3] != slots[4]  # a fresh slot after the kill
    # each point's own log holds its own lines only
    first_log = (Path(points[0]["exp_dir"]) / "container.log").read_text()
    assert "gate: failing" not in first_log and "infra-train: done" in first_log
    # the study record lists its points; nothing of the slots is left behind
    study = json.loads((swork / "studies" / f"{doc['study_id']}.json").read_text())
    assert [p["experiment_id"] for p in study["points"]] == [p["experiment_id"] for p in points]
    assert list((swork / "experiments" / ".slots").iterdir()) == []
    assert len(slot_pids(swork)) == 2 and alive(slot_pids(swork)) == set()


def test_a_point_in_a_study_equals_the_point_run_alone(swork, tmp_path):
    """The same metrics, bit for bit at equal thread counts, whatever ran before it in the slot."""
    plan = plan_file(swork)
    code, doc, err = sweep(
        swork, plan, "--sweep", 'model=[{"name":"ridge"},{"name":"mlp"}]', "--sweep", "train.seed=0,1"
    )
    assert code == 0, err
    last = doc["experiments"][-1]  # mlp seed 1: after ridge (whose fit it reused) and mlp seed 0
    assert "closed-form fit reused" in (Path(last["exp_dir"]) / "container.log").read_text()

    alone = tmp_path / "alone"
    shutil.copytree(swork, alone, ignore=shutil.ignore_patterns("experiments", "studies"))
    code, single, err = sweep(alone, plan_file(alone), "--set", 'model={"name":"mlp"}', "--set", "train.seed=1")
    assert code == 0, err
    in_study = json.loads((Path(last["exp_dir"]) / "metrics" / "metrics.json").read_text())
    by_itself = json.loads((Path(single["exp_dir"]) / "metrics" / "metrics.json").read_text())
    for key in ("test", "val", "train", "start", "selected", "best_epoch", "epochs", "n"):
        assert in_study[key] == by_itself[key], key
    curves = [json.loads(line) for line in (Path(last["exp_dir"]) / "metrics" / "metrics.jsonl").open()]
    alone_curves = [json.loads(line) for line in (Path(single["exp_dir"]) / "metrics" / "metrics.jsonl").open()]
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731 - wall time differs
    assert list(map(strip, curves)) == list(map(strip, alone_curves))


def gated_plan(work: Path) -> Path:
    """3 epochs of the gate model: each point waits at its gate after its first checkpoint."""
    plan = plan_file(work, "gated", max_epochs=3, early_stopping_patience=0)
    doc = json.loads(plan.read_text())
    doc["model"] = {"name": "gate", "params": {}}
    plan.write_text(json.dumps(doc))
    return plan


def held(exp_dir: Path) -> bool:
    return (exp_dir / "metrics" / ".gate-waiting").exists()


def held_points(work: Path) -> list[Path]:
    root = work / "experiments"
    return sorted(p for p in root.glob("gated-*") if held(p)) if root.exists() else []


def test_stop_one_point_then_resume_it(swork, tmp_path):
    plan = gated_plan(swork)
    args = ("run", str(plan), "--backend", "local", "--json", "--sweep", "train.seed=0,1")
    runner = infra_background(*args, workdir=swork, log=tmp_path / "study.log")
    try:
        (first,) = wait_for(lambda: held_points(swork), 300, "point 1 held at its gate")
        stopped = infra("stop", first.name, "--json", workdir=swork, timeout=300)
        assert stopped.returncode == 0, stopped.stderr
        assert json.loads(stopped.stdout)["state"] == "cancelled"
        assert (first / "ckpts" / "last.ckpt").is_file()
        # the study goes on with point 2 (in the same slot): let it finish
        (second,) = wait_for(lambda: [p for p in held_points(swork) if p != first], 300, "point 2 held at its gate")
        (second / "metrics" / ".gate-open").touch()
        assert runner.wait(timeout=600) == 1, (tmp_path / "study.log").read_text()  # a point was stopped
    finally:
        if runner.poll() is None:
            runner.kill()
    assert record(first)["state"] == "cancelled" and record(second)["state"] == "succeeded"
    assert record(first)["slot"]["name"] == record(second)["slot"]["name"]

    # running the study again resumes the stopped point from its checkpoint and reports the other
    (first / "metrics" / ".gate-open").touch()
    result = infra(*args, workdir=swork, timeout=900)
    assert result.returncode == 0, result.stderr
    points = json.loads(result.stdout)["experiments"]
    assert [p["reused"] for p in points] == [False, True]
    assert record(first)["state"] == "succeeded" and record(first)["attempt"] == 2
    events = [json.loads(line) for line in (first / "logs" / "events.jsonl").open()]
    assert any(e.get("phase") == "resume" for e in events)


def run_until_stopped(runner, log: Path, stop) -> tuple[int, str, dict]:
    """Call `stop()` on the running study, wait for its runner: (exit code, its output, its --json summary)."""
    try:
        stop()
        code = runner.wait(timeout=300)
    finally:
        if runner.poll() is None:
            runner.kill()
    output = log.read_text()
    summary = json.loads(next((line for line in reversed(output.splitlines()) if line.startswith("{")), "{}"))
    return code, output, summary


def test_interrupting_the_study_stops_every_point(swork, tmp_path):
    plan = gated_plan(swork)
    args = ("run", str(plan), "--backend", "local", "--json", "--sweep", "train.seed=0,1,2", "--parallel", "2")
    runner = infra_background(*args, workdir=swork, log=tmp_path / "study.log")

    def ctrl_c() -> None:
        wait_for(lambda: len(held_points(swork)) == 2, 300, "two points held at their gates")
        os.kill(runner.pid, signal.SIGINT)

    code, output, summary = run_until_stopped(runner, tmp_path / "study.log", ctrl_c)
    assert code == 130, output
    states = sorted(record(p)["state"] for p in (swork / "experiments").glob("gated-*"))
    assert states == ["cancelled", "cancelled"], output  # the third point never started
    assert [p["state"] for p in summary["experiments"]].count("not run") == 1
    assert alive(slot_pids(swork)) == set()


def test_a_killed_runner_leaves_points_that_status_calls_lost(swork, tmp_path):
    plan = gated_plan(swork)
    env = {"INFRA_SLOT_ALIVE_TIMEOUT": "3"}
    runner = infra_background("run", str(plan), "--backend", "local", "--sweep", "train.seed=0,1", workdir=swork,
                              log=tmp_path / "study.log", env=env)  # fmt: skip
    (point,) = wait_for(lambda: held_points(swork), 300, "point 1 held at its gate")
    runner.kill()  # SIGKILL: nothing of the runner survives to tidy up
    runner.wait()
    # the slot sees its host's alive file go stale, stops the point (checkpoint) and exits
    pids = slot_pids(swork)
    assert len(pids) == 1
    wait_for(lambda: alive(pids) == set(), 120, "the orphaned slot to stop")
    status = infra("status", point.name, "--json", workdir=swork)
    doc = json.loads(status.stdout)
    assert doc["state"] == "lost" and "run the study again" in doc["message"]
    assert (point / "ckpts" / "last.ckpt").is_file()


def test_stop_of_the_study_stops_it_as_a_whole(swork, tmp_path):
    """`infra stop STUDY_ID` from another shell: the running point checkpoints and ends cancelled, the
    runner starts no further point and ends (exit 130), the rest stay `not run`."""
    plan = gated_plan(swork)
    args = ("run", str(plan), "--backend", "local", "--json", "--sweep", "train.seed=0,1,2")
    runner = infra_background(*args, workdir=swork, log=tmp_path / "study.log")
    stopped = []

    def stop_the_study() -> None:
        wait_for(lambda: held_points(swork), 300, "point 1 held at its gate")
        (study_file,) = (swork / "studies").glob("*.json")
        stopped.append(infra("stop", study_file.stem, workdir=swork, timeout=300))

    code, output, summary = run_until_stopped(runner, tmp_path / "study.log", stop_the_study)
    (first,) = list((swork / "experiments").glob("gated-*"))[:1]
    stopped = stopped[0]
    assert stopped.returncode == 0, stopped.stderr
    assert code == 130, output
    assert [p["state"] for p in summary["experiments"]] == ["cancelled", "not run", "not run"]
    assert record(first)["state"] == "cancelled" and (first / "ckpts" / "last.ckpt").is_file()
    assert "2 point(s) not run yet stay so" in stopped.stderr


def test_an_os_error_while_running_a_point_fails_it_and_stops_the_study(swork, monkeypatch):
    """Not only infra's own errors: an OSError (a full disk, a lock) in a point's handling used to end the
    lane's thread silently, leaving the point `starting` and the study exit 1 without a word."""
    from runner.run.lanes import Lane
    from tests.helpers import cli

    def full_disk(self, target, record, view):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Lane, "run", full_disk)
    plan = plan_file(swork, "disk")
    result = cli("run", str(plan), "--backend", "local", "--json", "--sweep", "train.seed=0,1", workdir=swork)
    assert result.returncode == 3, result.stderr
    doc = json.loads(result.stdout)
    first, second = doc["experiments"]
    assert first["state"] == "error" and first["exit_code"] == 3
    assert first["message"] == f"point {first['experiment_id']}: OSError: [Errno 28] No space left on device"
    assert second["state"] == "not run"  # no further point starts
    assert record(first["exp_dir"])["state"] == "failed"
    assert "No space left on device" in record(first["exp_dir"])["message"]


def test_a_stop_while_a_point_is_handed_over_stops_that_point(swork, monkeypatch):
    """Ctrl-C or `infra stop` between the lane's check and the point's number: the stop named the
    previous point (or none) and the new point trained to its end."""
    from runner.run.lanes import Lane
    from tests.helpers import cli

    hand_over = Lane._run_point

    def stopped_in_between(self, *args):
        self.stopped = True  # what request_stop sets, after run() looked and before the slot numbers the point
        return hand_over(self, *args)

    monkeypatch.setattr(Lane, "_run_point", stopped_in_between)

    def open_gates() -> None:  # only if the stop never reached the point: then it trains to its end
        for metrics in (swork / "experiments").glob("gated-*/metrics"):
            (metrics / ".gate-open").touch()

    deadline = threading.Timer(120, open_gates)  # the point is held at its gate until stopped
    deadline.start()
    try:
        result = cli("run", str(gated_plan(swork)), "--backend", "local", "--json", "--sweep", "train.seed=0",
                     workdir=swork)  # fmt: skip
    finally:
        deadline.cancel()
    (point,) = json.loads(result.stdout)["experiments"]
    assert point["state"] == "cancelled", result.stderr
    assert record(point["exp_dir"])["state"] == "cancelled"
