"""An explicit `experiment_id` names one plan: reusing it for another plan is refused (exit 2) before
anything is reported, attached to or resumed, unless `--rerun` replaces that experiment.

Real files: the first plan's attempt is opened by the same function a run uses (`open_attempt`),
so `config/plan.json` and `status.json` are what a run leaves. The end-to-end attack (a real run,
then the same id with another model) is in tests/test_run_docker.py.
"""

from __future__ import annotations

import json

import pytest

from runner import safefs
from runner.errors import UsageError
from runner.plan.load import load_plan
from runner.plan.models import GpuRequest
from runner.run import launch
from runner.run.records import Experiment


def target(tmp_path, mini_db, **changes) -> launch.Target:
    doc = {"name": "first", "experiment_id": "shared-id", "data": {"db": str(mini_db)}, "model": {"name": "linear"}}
    for key, value in changes.items():
        doc[key] = value
    return launch.Target.of(load_plan("p", text=json.dumps(doc)), tmp_path, None, GpuRequest.parse(None))


def previous_attempt(tmp_path, mini_db, state: str) -> dict:
    first = target(tmp_path, mini_db)
    launch.open_attempt(first, "docker", None, rerun=False)
    return first.exp.update(state=state, exit_code=0 if state == "succeeded" else 1)


@pytest.mark.parametrize("state", ["succeeded", "failed"])
def test_an_id_that_holds_another_plan_is_refused_naming_both(tmp_path, mini_db, state):
    previous_attempt(tmp_path, mini_db, state)
    other = target(tmp_path, mini_db, name="other", model={"name": "ridge"})
    with pytest.raises(UsageError) as info:
        launch.refuse_other_plan(other, Experiment(other.exp.root).read())
    assert info.value.exit_code == 2
    assert info.value.message == (
        "experiment_id 'shared-id' already holds another plan ('first' vs 'other'; they differ in model.name, "
        "name): choose another experiment_id, leave it out to derive one, or pass --rerun to replace that experiment"
    )
    assert Experiment(other.exp.root).read()["state"] == state  # nothing changed


def test_the_same_plan_or_one_that_differs_only_in_where_it_runs_is_accepted(tmp_path, mini_db):
    record = previous_attempt(tmp_path, mini_db, "failed")
    launch.refuse_other_plan(target(tmp_path, mini_db), record)
    launch.refuse_other_plan(target(tmp_path, mini_db, resources={"memory": "2g", "cpus": 1}), record)


def test_decide_refuses_unless_rerun_replaces_it(tmp_path, mini_db):
    from runner.run.backends import backend_for

    previous_attempt(tmp_path, mini_db, "succeeded")
    other = target(tmp_path, mini_db, model={"name": "ridge"})
    with pytest.raises(UsageError, match="differ in model.name"):
        launch.decide(other, backend_for("docker"), rerun=False)
    assert launch.decide(other, backend_for("docker"), rerun=True)["state"] == "succeeded"


def test_a_rewritten_plan_file_is_not_believed(tmp_path, mini_db):
    """config/plan.json is in a folder the training writes: a copy of the new plan planted there
    must not make the old experiment look like the new plan's."""
    record = previous_attempt(tmp_path, mini_db, "succeeded")
    other = target(tmp_path, mini_db, model={"name": "ridge"})
    safefs.write_atomic(other.exp.root, "config/plan.json", json.dumps(other.resolved).encode())
    with pytest.raises(UsageError) as info:
        launch.refuse_other_plan(other, record)
    assert f"plan_sha256 {record['plan_sha256'][:12]} vs {other.plan_sha[:12]}" in info.value.message


def test_rerun_does_not_replace_a_running_experiment_of_another_plan(tmp_path, mini_db):
    """--rerun would attach to the running attempt and report its (the other plan's) result."""
    import subprocess
    import sys

    from runner.run.backends import backend_for

    previous_attempt(tmp_path, mini_db, "running")
    first = target(tmp_path, mini_db)
    # a live process that names the experiment, as a local training does (held on its stdin)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()", first.exp.id], stdin=subprocess.PIPE
    )
    try:
        first.exp.update(backend="local", pid=holder.pid)
        other = target(tmp_path, mini_db, model={"name": "ridge"})
        with pytest.raises(UsageError, match="differ in model.name"):
            launch.decide(other, backend_for("local"), rerun=True)
        assert first.exp.read()["state"] == "running"
    finally:
        holder.communicate(b"")


def test_a_plan_that_ran_before_a_new_plan_key_existed_is_the_same_plan(tmp_path, mini_db):
    """A key added to plans later (at its default) is no difference (review of issue 24: every fixed-id
    experiment made before `data.covariates` existed was refused as "another plan")."""
    record = previous_attempt(tmp_path, mini_db, "succeeded")
    first = target(tmp_path, mini_db)
    old = dict(first.resolved, data={k: v for k, v in first.resolved["data"].items() if k != "covariates"})
    assert old != first.resolved  # what an older infra wrote: no such key
    from runner.run.records import plan_sha256

    safefs.write_atomic(first.exp.root, "config/plan.json", json.dumps(old).encode())
    record = first.exp.update(plan_sha256=plan_sha256(old))
    launch.refuse_other_plan(target(tmp_path, mini_db), record)  # accepted
    with pytest.raises(UsageError, match="differ in model.name"):
        launch.refuse_other_plan(target(tmp_path, mini_db, model={"name": "ridge"}), record)
