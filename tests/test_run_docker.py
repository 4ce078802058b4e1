"""`infra run` against the real Docker engine: the demo trains in a container and leaves the full layout.

These tests build the CPU base image from this checkout on the local base OS image
(scripts/make-base-os-image.sh) with the offline wheelhouse (scripts/make-wheelhouse.sh); .ci/run
prepares both. They run `infra` as a non-root user (created here when the tests run as root). A run
that a test must catch in the act trains the gate model (tests/gate_model.py), held until the test acts.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import pytest

from tests.e2e import add_gate_model, gated, infra_as, labelled_containers, wait_for, wait_for_gate

pytestmark = [pytest.mark.docker, pytest.mark.slow]
LAYOUT = [
    "status.json",
    "events.jsonl",
    "config/plan.json",
    "config/query.json",
    "config/environment.json",
    "data/selected.parquet",
    "container.log",
    "logs/train.log",
    "metrics/metrics.jsonl",
    "metrics/metrics.json",
    "ckpts/last.ckpt",
    "ckpts/best.ckpt",
    "artifacts/model.pth",
    "artifacts/labels.npz",
    "artifacts/predictions.parquet",
]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_demo_plan_trains_in_container(base_image, workdir, run_user, docker_client):
    uid, gid, _ = run_user
    db = workdir / "data" / "blat_ecolx.db"
    before = sha256(db)
    result = infra_as(run_user, "run", "plans/demo.json", "--json", workdir=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(result.stdout)
    assert doc["state"] == "succeeded" and doc["backend"] == "docker"
    exp_dir = Path(doc["exp_dir"])
    for rel in LAYOUT:
        assert (exp_dir / rel).is_file(), rel
    assert list((exp_dir / "artifacts" / "visualization").glob("*.png"))
    metrics = json.loads((exp_dir / "metrics" / "metrics.json").read_text())
    assert metrics["test"]["spearman"] > 0.5  # one-hot linear on BLAT: ~0.75 with a random split
    assert doc["test"]["spearman"] == metrics["test"]["spearman"]
    for path in [exp_dir, *exp_dir.rglob("*")]:
        st = path.lstat()
        assert (st.st_uid, st.st_gid) == (uid, gid), f"{path} owned by {st.st_uid}:{st.st_gid}"
    assert sha256(db) == before
    env = json.loads((exp_dir / "config" / "environment.json").read_text())
    assert json.dumps(env)  # written by the core inside the container
    assert labelled_containers(docker_client, workdir) == []  # finished containers are removed, logs kept

    again = infra_as(run_user, "run", "plans/demo.json", "--json", workdir=workdir)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout)["reused"] is True
    assert "already succeeded" in again.stderr

    # The same id for another plan (issue 23, #7): refused, naming both, before anything is reported.
    exp_id = doc["experiment_id"]
    sets = ("--set", f"experiment_id={exp_id}", "--set", "model.name=cnn", "--set", "name=other")
    other = infra_as(run_user, "run", "plans/demo.json", *sets, workdir=workdir)
    assert other.returncode == 2, other.stderr[-2000:]
    assert f"experiment_id '{exp_id}' already holds another plan" in other.stderr
    assert "differ in model.name, name" in other.stderr and "spearman" not in other.stdout + other.stderr
    assert json.loads((exp_dir / "status.json").read_text())["state"] == "succeeded"


def test_failing_plugin_exit_1_with_traceback(base_image, workdir, run_user):
    (workdir / "model" / "exploding.py").write_text(
        "import torch\n"
        "from runner.core.models import ProteinModel, register_model\n\n\n"
        "@register_model('exploding')\n"
        "class Exploding(ProteinModel):\n"
        "    def __init__(self, seq_len, in_dim, n_outputs=1):\n"
        "        super().__init__(seq_len, in_dim, n_outputs)\n"
        "        self.w = torch.nn.Linear(1, 1)\n\n"
        "    def forward(self, x):\n"
        "        raise ValueError('plugin exploded on purpose')\n"
    )
    os.chown(workdir / "model" / "exploding.py", *run_user[:2])
    result = infra_as(run_user, "run", "plans/demo.json", "--set", "model.name=exploding", "--json", workdir=workdir)
    assert result.returncode == 1, result.stderr[-2000:]
    doc = json.loads(result.stdout)
    assert doc["state"] == "failed" and doc["exit_code"] == 1
    log = (Path(doc["exp_dir"]) / "container.log").read_text()
    assert "Traceback" in log and "plugin exploded on purpose" in log and "exploding.py" in log


def test_gpus_without_runtime_exit_3_and_nothing_left(base_image, workdir, run_user, docker_client):
    from runner import engine

    if engine.gpu_runtime_available(docker_client):
        pytest.skip("this engine has a GPU runtime")
    before = {c.id for c in labelled_containers(docker_client, workdir)}
    result = infra_as(run_user, "run", "plans/demo.json", "--gpus", "all", workdir=workdir)
    assert result.returncode == 3
    assert "NVIDIA Container Toolkit" in result.stderr
    assert {c.id for c in labelled_containers(docker_client, workdir)} == before
    assert not (workdir / "experiments").exists() or not any((workdir / "experiments").glob("*/status.json"))


def test_docker_kill_leaves_failed_with_logs(base_image, workdir, run_user, docker_client):
    add_gate_model(workdir, run_user)
    result = infra_as(run_user, "run", "plans/demo.json", "--detach", "--json", *gated(), workdir=workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    doc = json.loads(result.stdout)
    exp_dir, exp_id = Path(doc["exp_dir"]), doc["experiment_id"]
    assert doc["state"] == "running"
    assert wait_for_gate(workdir) == exp_dir  # held after its first epoch
    docker_client.containers.get(doc["container_id"]).kill()

    def final_status():
        doc = json.loads(infra_as(run_user, "status", exp_id, "--json", workdir=workdir).stdout)
        return doc if doc["state"] != "running" else None

    status = wait_for(final_status, 60, "a final state")
    assert status["state"] == "failed" and status["exit_code"] == 137
    assert "epoch" in (exp_dir / "container.log").read_text().lower()


def test_ctrl_c_leaves_cancelled_with_checkpoint(base_image, workdir, run_user, docker_client):
    # held at its first step: the checkpoint can only come from the stop
    add_gate_model(workdir, run_user)
    args = ("run", "plans/demo.json", *gated(after_checkpoint=False), "--stop-timeout", "60")
    proc = infra_as(run_user, *args, workdir=workdir, background=True)
    try:
        exp_dir = wait_for_gate(workdir)
        assert not (exp_dir / "ckpts" / "last.ckpt").exists()
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # the Ctrl-C did not end it: neither it nor its gated training may linger
            proc.kill()
            for container in labelled_containers(docker_client, workdir):
                container.remove(force=True)
    assert proc.returncode == 130, err[-2000:]
    status = json.loads((exp_dir / "status.json").read_text())
    assert status["state"] == "cancelled"
    assert (exp_dir / "ckpts" / "last.ckpt").is_file()
    assert "interrupted" in err


def test_out_of_memory_is_said_in_the_foreground(base_image, workdir, run_user):
    """A training killed by the container's memory limit says so where the user is looking (issue 23,
    low: the foreground follow said only `exit code 137`, while `infra status` said out of memory)."""
    result = infra_as(run_user, "run", "plans/demo.json", "--set", "resources.memory=100m", workdir=workdir)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "(exit code 137): the training was killed: out of memory (resources.memory)" in result.stderr
