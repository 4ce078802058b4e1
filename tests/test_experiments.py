"""Experiment records: ids, atomic status, append-only events, reconciliation of local records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from runner.errors import UnknownExperiment, UsageError
from runner.run.reconcile import final_state, list_experiments, parse_since, reconcile
from runner.run.records import Experiment, derive_experiment_id, find, new_record


def resolved_plan(db, **over):
    plan = {
        "name": "blat",
        "experiment_id": None,
        "data": {"db": str(db)},
        "model": {"name": "linear"},
        "resources": {"gpus": "none"},
    }
    plan.update(over)
    return plan


def test_derived_id_is_stable_and_sensitive(mini_db):
    a = derive_experiment_id(resolved_plan(mini_db), "hash1")
    assert a == derive_experiment_id(resolved_plan(mini_db), "hash1")
    assert a.startswith("blat-") and len(a) == len("blat-") + 10
    assert a != derive_experiment_id(resolved_plan(mini_db), "hash2")
    assert a != derive_experiment_id(resolved_plan(mini_db, model={"name": "cnn"}), "hash1")
    # where it runs does not matter
    assert a == derive_experiment_id(resolved_plan(mini_db, resources={"gpus": "all"}), "hash1")
    # re-importing the database makes a new experiment
    os.utime(mini_db, ns=(1, 1))
    assert a != derive_experiment_id(resolved_plan(mini_db), "hash1")
    assert derive_experiment_id(resolved_plan(mini_db, experiment_id="mine"), "x") == "mine"


def make_exp(tmp_path, state="created", backend="local", **fields) -> Experiment:
    exp = Experiment(tmp_path / "experiments" / "blat-0123456789")
    exp.make_layout()
    record = new_record(exp, name="blat", backend=backend, plan_sha="0" * 64, attempt=1, previous=None)
    record.update(state=state, **fields)
    exp.write(record)
    return exp


def test_status_writes_are_atomic_and_events_append(tmp_path):
    exp = make_exp(tmp_path)
    exp.update(state="running", pid=123)
    exp.update(state="failed", exit_code=1)
    assert exp.read()["state"] == "failed"
    assert [e["state"] for e in exp.events() if e["event"] == "state"] == ["running", "failed"]
    assert not [p for p in exp.root.iterdir() if p.name.startswith(".status")]


def test_concurrent_event_appends_never_interleave(tmp_path):
    exp = make_exp(tmp_path)

    def writer(n):
        for i in range(200):
            exp.event("progress", writer=n, i=i, pad="x" * 500)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    events = exp.events()  # every line parses
    assert len([e for e in events if e["event"] == "progress"]) == 800


def test_unknown_experiment_exit_4(tmp_path):
    with pytest.raises(UnknownExperiment) as info:
        find(tmp_path, "nope")
    assert info.value.exit_code == 4
    assert "no experiment 'nope'" in info.value.message
    with pytest.raises(UnknownExperiment):
        find(tmp_path, "../etc")


def test_final_state_rules():
    assert final_state(0, False) == "succeeded"
    assert final_state(143, False) == "cancelled"
    assert final_state(137, True) == "cancelled"
    assert final_state(137, False) == "failed"
    assert final_state(1, False) == "failed"


def test_reconcile_local_dead_process_without_exit_code_is_lost(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    exp = make_exp(tmp_path, state="running", pid=proc.pid)
    record = reconcile(exp)
    assert record["state"] == "lost"
    assert "no exit code" in record["message"]


def test_reconcile_local_uses_exit_code_file(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    exp = make_exp(tmp_path, state="running", pid=proc.pid)
    (exp.root / ".exit_code").write_text("0\n")
    assert reconcile(exp)["state"] == "succeeded"


def test_reconcile_keeps_live_local_process_running(tmp_path):
    exp = make_exp(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", "import time, sys; time.sleep(30)", str(exp.root)])
    try:
        exp.update(state="running", pid=proc.pid)
        assert reconcile(exp)["state"] == "running"
    finally:
        proc.kill()
        proc.wait()


def test_localwrap_records_exit_code_and_forwards_sigterm(tmp_path):
    exit_file = tmp_path / "code"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "runner.run.local_wrapper",
            str(exit_file),
            sys.executable,
            "-c",
            "import sys; sys.exit(7)",
        ]
    )
    assert done.returncode == 7 and exit_file.read_text().strip() == "7"
    child = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner.run.local_wrapper", str(exit_file), sys.executable, "-c", child],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.terminate()
    assert proc.wait(timeout=10) == 143
    assert exit_file.read_text().strip() == "143"


def test_list_filters_and_since(tmp_path):
    make_exp(tmp_path, state="succeeded")
    assert [r["state"] for r in list_experiments(tmp_path)] == ["succeeded"]
    assert list_experiments(tmp_path, states=["running"]) == []
    assert len(list_experiments(tmp_path, since="1h")) == 1
    assert list_experiments(tmp_path, since="2999-01-01T00:00:00Z") == []
    with pytest.raises(UsageError, match="--state 'runing': use one of"):
        list_experiments(tmp_path, states=["runing"])
    with pytest.raises(UsageError, match="--since 'yesterday'"):
        parse_since("yesterday")


@pytest.mark.parametrize("value", ["1000000d", "9" * 30 + "s", "9" * 5000 + "m"])
def test_since_too_far_back_is_a_usage_error(value):
    with pytest.raises(UsageError, match=r"reaches back before year 1; use a smaller age or an ISO time"):
        parse_since(value)


def test_since_unicode_digits_are_not_an_age():
    with pytest.raises(UsageError, match="use an ISO time"):
        parse_since("\u00b2d")  # '²'.isdigit() is true, int('²') is not


def test_status_json_is_valid_json_after_many_updates(tmp_path):
    exp = make_exp(tmp_path)
    for i in range(50):
        exp.update(message=f"m{i}")
    assert json.loads(exp.status_path.read_text())["message"] == "m49"
