"""Driving a node over SSH the way the Master does: a real sshd on loopback, a real OpenSSH client,
real containers. Submissions are detached and idempotent; status never lies after a dropped
session or a killed runner; stop cancels and keeps the checkpoint. A run that a test must catch in
the act trains the gate model (tests/gate_model.py), held until the test opens the gate."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import jsonschema
import pytest

from tests.e2e import (
    REPO,
    add_gate_model,
    gated,
    infra_as,
    labelled_containers,
    open_gate,
    remote_infra,
    wait_for,
    wait_for_gate,
)

pytestmark = [pytest.mark.docker, pytest.mark.ssh, pytest.mark.slow]
STATUS_SCHEMA = json.loads((REPO / "schemas" / "status.schema.json").read_text())
EVENT_SCHEMA = json.loads((REPO / "schemas" / "event.schema.json").read_text())


def plan_text(workdir: Path, gate: bool = False) -> str:
    """The demo plan with an absolute database path; with `gate`, training the gate model (tests/e2e.py:
    gated), which holds the run after its first epoch until the test opens the gate."""
    doc = json.loads((workdir / "plans" / "demo.json").read_text())
    doc["data"]["db"] = str(workdir / "data" / "blat_ecolx.db")
    if gate:
        doc["data"]["limit"] = 400
        doc["train"].update(max_epochs=3, early_stopping_patience=0)
        doc["model"] = {"name": "gate", "params": {}}
    return json.dumps(doc)


@pytest.fixture
def gate_workdir(workdir, run_user) -> Path:
    add_gate_model(workdir, run_user)
    return workdir


def status_over_ssh(ssh, workdir, exp_id) -> dict:
    result = ssh(remote_infra(workdir, f"status {exp_id} --json"))
    assert result.returncode == 0, result.stderr[-2000:]
    doc = json.loads(result.stdout)
    jsonschema.validate(doc, STATUS_SCHEMA)
    return doc


def test_detached_submission_over_ssh_survives_dropped_client(sshd, base_image, workdir, docker_client):
    ssh = sshd
    # 1. detached submission, plan on stdin
    first = ssh(remote_infra(workdir, "run - --detach --json"), input=plan_text(workdir))
    assert first.returncode == 0, first.stderr[-3000:]
    doc = json.loads(first.stdout)
    assert doc["state"] == "running" and doc["experiment_id"].startswith("blat-demo-")
    exp_id = doc["experiment_id"]
    # 2. the same plan again (a retried submission) attaches to the same experiment: one container
    again = ssh(remote_infra(workdir, "run - --detach --json"), input=plan_text(workdir))
    assert again.returncode == 0 and json.loads(again.stdout)["experiment_id"] == exp_id
    assert len([c for c in labelled_containers(docker_client) if c.labels["infra.experiment_id"] == exp_id]) <= 1
    final = wait_for(
        lambda: (d := status_over_ssh(ssh, workdir, exp_id))["state"] in ("succeeded", "failed") and d,
        600,
        "the detached run to finish",
    )
    assert final["state"] == "succeeded", (final.get("message"), final)
    assert final["test"]["spearman"] > 0.5
    metrics = ssh(f"cat {final['exp_dir']}/metrics/metrics.json")
    assert json.loads(metrics.stdout)["test"]["spearman"] == final["test"]["spearman"]
    for line in (Path(final["exp_dir"]) / "events.jsonl").read_text().splitlines():
        jsonschema.validate(json.loads(line), EVENT_SCHEMA)


def test_killed_ssh_client_mid_run_then_poll(sshd, base_image, gate_workdir, run_user):
    ssh, workdir = sshd, gate_workdir
    proc = ssh(remote_infra(workdir, "run - --json"), background=True)
    proc.stdin.write(plan_text(workdir, gate=True))
    proc.stdin.close()
    exp_dir = wait_for_gate(workdir)
    proc.kill()  # the Master's SSH client dies mid-run
    proc.wait()
    open_gate(exp_dir, run_user)  # the training goes on without its client
    final = wait_for(
        lambda: (
            (d := status_over_ssh(ssh, workdir, exp_dir.name))["state"]
            not in ("created", "building", "starting", "running")
            and d
        ),
        600,
        "a final state",
    )
    assert final["state"] == "succeeded", (final.get("message"), final)


def test_concurrent_submissions_start_one_container(sshd, base_image, gate_workdir, docker_client):
    ssh, workdir = sshd, gate_workdir
    text = plan_text(workdir, gate=True)
    procs = [ssh(remote_infra(workdir, "run - --detach --json"), background=True) for _ in range(2)]
    for p in procs:
        p.stdin.write(text)
        p.stdin.close()
    docs = []
    for p in procs:
        out, err = p.stdout.read(), p.stderr.read()  # stdin is closed already: no communicate()
        assert p.wait(timeout=600) == 0, err[-2000:]
        docs.append(json.loads(out))
    assert docs[0]["experiment_id"] == docs[1]["experiment_id"]
    exp_id = docs[0]["experiment_id"]
    ids = {d["container_id"] for d in docs}
    assert len(ids) == 1, docs
    status = json.loads((workdir / "experiments" / exp_id / "status.json").read_text())
    assert status["attempt"] == 1
    # stop → cancelled, checkpoint kept
    assert wait_for_gate(workdir) == workdir / "experiments" / exp_id
    stopped = ssh(remote_infra(workdir, f"stop {exp_id} --timeout 60 --json"))
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    doc = json.loads(stopped.stdout)
    jsonschema.validate(doc, STATUS_SCHEMA)
    assert doc["state"] == "cancelled"
    assert (workdir / "experiments" / exp_id / "ckpts" / "last.ckpt").is_file()
    assert [c for c in labelled_containers(docker_client) if c.labels["infra.experiment_id"] == exp_id] == []


def test_sigkill_of_foreground_runner_status_tells_truth(base_image, gate_workdir, run_user, docker_client):
    workdir = gate_workdir
    proc = infra_as(run_user, "run", "plans/demo.json", *gated(), workdir=workdir, background=True)
    exp_dir = wait_for_gate(workdir)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    now = json.loads(infra_as(run_user, "status", exp_dir.name, "--json", workdir=workdir).stdout)
    assert now["state"] == "running"  # the container outlives its runner (held at the gate)
    open_gate(exp_dir, run_user)
    final = wait_for(
        lambda: (
            (d := json.loads(infra_as(run_user, "status", exp_dir.name, "--json", workdir=workdir).stdout))["state"]
            != "running"
            and d
        ),
        600,
        "a final state",
    )
    assert final["state"] == "succeeded"
    assert "epoch" in (exp_dir / "container.log").read_text().lower()
