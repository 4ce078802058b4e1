"""The Redis/RQ queue against a real redis-server: submit, duplicates, workers, SIGKILL recovery, status.

Workers run as real `infra worker` processes; most use the local backend (the same run path as
`infra run --backend local`), one uses Docker.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e import BASE_ENV, REPO, epoch_events, wait_for

pytestmark = pytest.mark.redis

# Until the lead registers the queue commands in runner/cli/__init__.py, tests add them to the app.
CLI = (
    "import sys\n"
    "from runner.cli import app, main\n"
    "from runner.cli import queue as q\n"
    "names = {c.name for c in app.registered_commands}\n"
    "if 'submit' not in names:\n"
    "    app.command('submit')(q.submit); app.command('worker')(q.worker); app.command('node')(q.node)\n"
    "    app.add_typer(q.queue_app, name='queue')\n"
    "main(sys.argv[1:])\n"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server on a free loopback port, no persistence; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed: apt-get install -y redis-server")
        pytest.skip("redis-server is not installed")
    port = _free_port()
    folder = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    import redis

    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_for(lambda: _pings(redis, url) or proc.poll() is not None, 20, "redis-server to answer")
        assert proc.poll() is None, "redis-server exited at start"
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _pings(redis, url) -> bool:
    try:
        return redis.Redis.from_url(url).ping()
    except redis.exceptions.ConnectionError:
        return False


@pytest.fixture
def redis_url(redis_server):
    import redis

    redis.Redis.from_url(redis_server).flushall()
    return redis_server


@pytest.fixture
def qworkdir(tmp_path) -> Path:
    """A workdir from the template with the demo database (BLAT, 4,997 variants)."""
    from runner.data.importer import build_demo_db

    work = tmp_path / "work"
    shutil.copytree(REPO / "plugins_template", work)
    build_demo_db(work / "data" / "blat.db")
    return work


def plan_file(folder: Path, name: str, **train) -> Path:
    doc = {
        "name": name,
        "data": {"db": "data/blat.db", "limit": train.pop("limit", 300)},
        "model": {"name": "linear"},
        "train": {"max_epochs": 1, "batch_size": 128, **train},
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(doc))
    return path


def infra(*args, workdir: Path, timeout: float = 120, env: dict | None = None):
    full_env = {**os.environ, "INFRA_WORKDIR": str(workdir), "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", CLI, *args], capture_output=True, text=True, timeout=timeout, env=full_env, cwd=workdir
    )


def start_worker(redis_url: str, workdir: Path, name: str, *extra: str, log: Path, env: dict | None = None):
    full_env = {**os.environ, "INFRA_WORKDIR": str(workdir), "PYTHONUNBUFFERED": "1", **(env or {})}
    args = [sys.executable, "-c", CLI, "worker", "--redis", redis_url, "--name", name, *extra]
    with open(log, "w") as fh:
        return subprocess.Popen(
            args, stdout=fh, stderr=subprocess.STDOUT, env=full_env, cwd=workdir, start_new_session=True
        )


def status_doc(redis_url: str, workdir: Path) -> dict:
    result = infra("queue", "status", "--redis", redis_url, "--json", workdir=workdir)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def job_of(redis_url: str, job_id: str):
    import redis
    from rq.job import Job
    from rq.serializers import JSONSerializer

    return Job.fetch(job_id, connection=redis.Redis.from_url(redis_url), serializer=JSONSerializer)


# --- fast: no training ----------------------------------------------------------------------------


def test_submit_reports_duplicates_and_validates_locally(redis_url, qworkdir):
    plan = plan_file(qworkdir, "dup")
    first = infra("submit", str(plan), "--redis", redis_url, "--json", workdir=qworkdir)
    assert first.returncode == 0, first.stderr
    doc = json.loads(first.stdout)
    assert doc["duplicate"] is False and doc["status"] == "queued" and doc["queue"] == "infra"
    assert doc["job_id"] == doc["experiment_id"] and doc["job_id"].startswith("dup-")

    again = infra("submit", str(plan), "--redis", redis_url, "--json", workdir=qworkdir)
    assert again.returncode == 0
    assert json.loads(again.stdout) == {**doc, "duplicate": True}
    assert "not enqueued again" in again.stderr

    other = infra("submit", str(plan), "--redis", redis_url, "--set", "train.seed=3", workdir=qworkdir)
    assert other.returncode == 0
    assert other.stdout.strip() != doc["job_id"] and other.stdout.strip().startswith("dup-")

    bad = infra("submit", str(plan), "--redis", redis_url, "--set", "train.lr=-1", "--json", workdir=qworkdir)
    assert bad.returncode == 2
    assert json.loads(bad.stdout)["error"]["errors"][0]["path"] == "train.lr"

    status = status_doc(redis_url, qworkdir)
    assert status["queues"] == [
        {"name": "infra", "queued": 2, "started": 0, "finished": 0, "failed": 0, "deferred": 0, "scheduled": 0}
    ]
    job = job_of(redis_url, doc["job_id"])
    assert job.timeout == -1  # no job timeout for training
    plan_sent = job.args[0]
    assert plan_sent["experiment_id"] == doc["job_id"]
    assert plan_sent["data"]["db"] == str(qworkdir / "data" / "blat.db")  # absolute, as the workers see it


def test_submit_id_is_the_experiment_id_for_an_explicit_one(redis_url, qworkdir):
    plan = plan_file(qworkdir, "named")
    result = infra("submit", str(plan), "--redis", redis_url, "--set", "experiment_id=my-exp-1", workdir=qworkdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "my-exp-1"


def test_unreachable_redis_is_an_environment_error(qworkdir):
    plan = plan_file(qworkdir, "nored")
    url = f"redis://:secret@127.0.0.1:{_free_port()}/0"
    result = infra("submit", str(plan), "--redis", url, workdir=qworkdir, timeout=60)
    assert result.returncode == 3
    assert "not reachable" in result.stderr and "redis-server" in result.stderr
    assert "secret" not in result.stderr  # the password is never printed


def test_redact_hides_the_password():
    from runner.queue import redact

    assert redact("rediss://user:pw@host:6380/1") == "rediss://user:***@host:6380/1"
    assert redact("redis://host:6379/0") == "redis://host:6379/0"


def test_gpu_slots():
    from runner.errors import UsageError
    from runner.queue import WorkerConfig, gpu_slots

    assert gpu_slots("0,1") == ["0", "1"]
    assert gpu_slots(None) == [None]
    with pytest.raises(UsageError, match="device ids"):
        gpu_slots("0,0")
    assert WorkerConfig("redis://x", Path("."), gpus="1").run_gpus() == ["1"]


# --- end to end: real workers, real training -------------------------------------------------------


@pytest.mark.slow
def test_two_workers_ten_plans_each_experiment_runs_once(redis_url, qworkdir, tmp_path):
    ids = []
    for seed in range(9):
        plan = plan_file(qworkdir, f"ten-{seed}", seed=seed)
        result = infra("submit", str(plan), "--redis", redis_url, "--json", workdir=qworkdir)
        assert result.returncode == 0, result.stderr
        ids.append(json.loads(result.stdout)["job_id"])
    dup = infra("submit", str(qworkdir / "ten-4.json"), "--redis", redis_url, "--json", workdir=qworkdir)
    assert json.loads(dup.stdout)["duplicate"] is True
    assert len(set(ids)) == 9

    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
    workers = [
        start_worker(redis_url, qworkdir, f"w{i}", "--backend", "local", "--burst", "--heartbeat-ttl", "6", log=logs[i])
        for i in range(2)
    ]
    # heartbeats: both workers and their node documents are visible while they work
    seen = wait_for(
        lambda: (lambda d: d if sum(w["alive"] for w in d["workers"]) == 2 else None)(status_doc(redis_url, qworkdir)),
        60,
        "two live workers in queue status",
    )
    node = seen["workers"][0]["node"]
    assert node["cpus"] >= 1 and node["memory"]["total_bytes"] > 0 and "free_bytes" in node["disk"]
    assert node["ttl_left_s"] <= 6

    for proc in workers:
        assert proc.wait(timeout=240) == 0, [p.read_text()[-2000:] for p in logs]
    status = status_doc(redis_url, qworkdir)
    assert status["queues"][0]["finished"] == 9 and status["queues"][0]["failed"] == 0
    assert status["queues"][0]["queued"] == 0 and status["queues"][0]["started"] == 0
    ran_on = set()
    for exp_id in ids:
        job = job_of(redis_url, exp_id)
        assert job.get_status() == "finished"
        result = job.return_value()
        assert result["state"] == "succeeded" and result["experiment_id"] == exp_id
        assert result["test"]["spearman"] is not None
        ran_on.add(result["worker"])
        events = [
            json.loads(line) for line in (qworkdir / "experiments" / exp_id / "events.jsonl").read_text().splitlines()
        ]
        assert sum(1 for e in events if e.get("state") == "created") == 1  # ran exactly once
    assert ran_on == {"w0", "w1"}


@pytest.mark.slow
def test_sigkilled_worker_job_resumes_from_checkpoint_on_another(redis_url, qworkdir, tmp_path):
    plan = plan_file(qworkdir, "killed", max_epochs=12, batch_size=32, limit=2000, early_stopping_patience=0)
    result = infra("submit", str(plan), "--redis", redis_url, "--json", workdir=qworkdir)
    exp_id = json.loads(result.stdout)["job_id"]
    exp_dir = qworkdir / "experiments" / exp_id
    ttl = "3"
    first = start_worker(
        redis_url, qworkdir, "doomed", "--backend", "local", "--heartbeat-ttl", ttl, log=tmp_path / "a.log"
    )
    try:
        wait_for(lambda: epoch_events(exp_dir) >= 2 and (exp_dir / "ckpts" / "last.ckpt").exists(), 120, "2 epochs")
        second = start_worker(
            redis_url, qworkdir, "rescuer", "--backend", "local", "--heartbeat-ttl", ttl, log=tmp_path / "b.log"
        )
        wait_for(lambda: len(status_doc(redis_url, qworkdir)["workers"]) == 2, 30, "the second worker")
        # The node dies: the worker and the training it runs are SIGKILLed.
        training_pid = json.loads((exp_dir / "status.json").read_text())["pid"]
        os.killpg(first.pid, signal.SIGKILL)
        os.killpg(training_pid, signal.SIGKILL)
        first.wait(timeout=10)
        epochs_before = epoch_events(exp_dir)

        job = wait_for(
            lambda: (lambda j: j if j.get_status() in ("finished", "failed") else None)(job_of(redis_url, exp_id)),
            180,
            "the job to finish on the other worker",
        )
        assert job.get_status() == "finished", (tmp_path / "b.log").read_text()[-3000:]
        result = job.return_value()
        assert result["state"] == "succeeded" and result["worker"] == "rescuer" and result["attempt"] == 2
        events = [json.loads(line) for line in (exp_dir / "events.jsonl").read_text().splitlines()]
        assert any(e.get("phase") == "resume" for e in events), "the second attempt did not resume from last.ckpt"
        assert epoch_events(exp_dir) < epochs_before + 12  # it did not start over
        assert "AbandonedJobError" not in json.dumps(result)
        second.send_signal(signal.SIGTERM)  # idle: the first SIGTERM stops it at once
        assert second.wait(timeout=30) == 0
    finally:
        for proc in (first, locals().get("second")):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_second_sigterm_checkpoints_and_requeues(redis_url, qworkdir, tmp_path):
    plan = plan_file(qworkdir, "stopped", max_epochs=12, batch_size=32, limit=2000, early_stopping_patience=0)
    exp_id = json.loads(infra("submit", str(plan), "--redis", redis_url, "--json", workdir=qworkdir).stdout)["job_id"]
    exp_dir = qworkdir / "experiments" / exp_id
    proc = start_worker(redis_url, qworkdir, "stopper", "--backend", "local", log=tmp_path / "w.log")
    try:
        wait_for(lambda: epoch_events(exp_dir) >= 2, 120, "2 epochs")
        proc.send_signal(signal.SIGTERM)  # warm shutdown: would finish the job
        wait_for(lambda: "warm shut down" in (tmp_path / "w.log").read_text(), 10, "the warm shutdown")
        time.sleep(1.2)  # RQ ignores a second signal within 1 s of the first
        proc.send_signal(signal.SIGTERM)  # cold: checkpoint, cancel, requeue
        assert proc.wait(timeout=90) == 0, (tmp_path / "w.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    record = json.loads((exp_dir / "status.json").read_text())
    assert record["state"] == "cancelled" and (exp_dir / "ckpts" / "last.ckpt").exists()
    assert job_of(redis_url, exp_id).get_status() == "queued"
    again = start_worker(redis_url, qworkdir, "finisher", "--backend", "local", "--burst", log=tmp_path / "w2.log")
    assert again.wait(timeout=180) == 0
    result = job_of(redis_url, exp_id).return_value()
    assert result["state"] == "succeeded" and result["attempt"] == 2
    events = [json.loads(line) for line in (exp_dir / "events.jsonl").read_text().splitlines()]
    assert any(e.get("phase") == "resume" for e in events)


@pytest.mark.slow
@pytest.mark.docker
def test_worker_with_docker_backend(redis_url, workdir, run_user, base_image, tmp_path):
    import pwd

    uid, gid, name = run_user
    db = workdir / "data" / "blat_ecolx.db"
    plan = workdir / "queued.json"
    plan.write_text(
        json.dumps(
            {
                "name": "queued-docker",
                "data": {"db": str(db), "limit": 300},
                "model": {"name": "linear"},
                "train": {"max_epochs": 1},
            }
        )
    )
    os.chown(plan, uid, gid)
    result = infra("submit", str(plan), "--redis", redis_url, "--json", workdir=workdir)
    assert result.returncode == 0, result.stderr
    exp_id = json.loads(result.stdout)["job_id"]
    env = {**os.environ, **BASE_ENV, "INFRA_WORKDIR": str(workdir), "PYTHONUNBUFFERED": "1"}
    env.pop("XDG_CONFIG_HOME", None)
    cmd = [sys.executable, "-c", CLI, "worker", "--redis", redis_url, "--backend", "docker", "--burst", "--name", "dw"]
    if os.geteuid() == 0 and uid != 0:
        env["HOME"] = pwd.getpwnam(name).pw_dir
        cmd = ["runuser", "-u", name, "--", *cmd]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = job_of(redis_url, exp_id)
    assert job.get_status() == "finished", proc.stderr[-3000:]
    result = job.return_value()
    assert result["state"] == "succeeded" and result["backend"] == "docker" and result["image_id"]
    record = json.loads((workdir / "experiments" / exp_id / "status.json").read_text())
    assert record["state"] == "succeeded" and record["container_id"]
    assert os.stat(workdir / "experiments" / exp_id).st_uid == uid  # never owned by root
