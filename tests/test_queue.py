"""The Redis/RQ queue against a real redis-server: submit, duplicates, the job guard, workers, SIGKILL recovery, status.

Workers run as real `infra worker` processes; most use the local backend (the same run path as
`infra run --backend local`), one uses Docker. Trainings that a test must catch in the act are held
by the `gate` plugin model (tests/gate_model.py) until the test opens the gate: no test depends on
a training being slow.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e import BASE_ENV, epoch_events, wait_for
from tests.helpers import INFRA, cli, gate_workdir, infra, infra_background

pytestmark = pytest.mark.redis


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
    """A workdir from the template with the demo database (BLAT) and the gate model."""
    return gate_workdir(tmp_path / "work")


def plan_file(folder: Path, name: str, model: dict | None = None, **train) -> Path:
    doc = {
        "name": name,
        "data": {"db": "data/blat.db", "limit": train.pop("limit", 300)},
        "model": model or {"name": "linear"},
        "train": {"max_epochs": 1, "batch_size": 128, **train},
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(doc))
    return path


def gated_plan(folder: Path, name: str, **gate) -> Path:
    """A 3-epoch plan whose training waits at the gate (after its first checkpoint, by default)."""
    model = {"name": "gate", "params": gate}
    return plan_file(folder, name, model=model, max_epochs=3, batch_size=32, early_stopping_patience=0)


def submit_plan(redis_url: str, workdir: Path, plan: Path, *extra: str) -> str:
    result = cli("submit", str(plan), "--redis", redis_url, "--json", *extra, workdir=workdir)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["job_id"]


def start_worker(redis_url: str, workdir: Path, name: str, *extra: str, log: Path):
    return infra_background("worker", "--redis", redis_url, "--name", name, *extra, workdir=workdir, log=log)


def status_doc(redis_url: str, workdir: Path) -> dict:
    result = cli("queue", "status", "--redis", redis_url, "--json", workdir=workdir)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def job_of(redis_url: str, job_id: str):
    import redis
    from rq.job import Job

    from runner.queue.connection import serializer

    return Job.fetch(job_id, connection=redis.Redis.from_url(redis_url), serializer=serializer())


def events_of(exp_dir: Path) -> list[dict]:
    """The host's state events and the training's progress events of an experiment."""
    lines = []
    for rel in ("events.jsonl", "logs/events.jsonl"):
        path = exp_dir / rel
        lines += path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines]


def kill_group(proc) -> None:
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


# --- fast: no training ----------------------------------------------------------------------------


def test_submit_reports_duplicates_and_validates_locally(redis_url, qworkdir):
    plan = plan_file(qworkdir, "dup")
    first = cli("submit", str(plan), "--redis", redis_url, "--json", workdir=qworkdir)
    assert first.returncode == 0, first.stderr
    doc = json.loads(first.stdout)
    assert doc["duplicate"] is False and doc["status"] == "queued" and doc["queue"] == "infra"
    assert doc["job_id"] == doc["experiment_id"] and doc["job_id"].startswith("dup-")

    again = cli("submit", str(plan), "--redis", redis_url, "--json", workdir=qworkdir)
    assert again.returncode == 0
    assert json.loads(again.stdout) == {**doc, "duplicate": True}
    assert "not enqueued again" in again.stderr

    other = cli("submit", str(plan), "--redis", redis_url, "--set", "train.seed=3", workdir=qworkdir)
    assert other.returncode == 0
    assert other.stdout.strip() != doc["job_id"] and other.stdout.strip().startswith("dup-")

    bad = cli("submit", str(plan), "--redis", redis_url, "--set", "train.lr=-1", "--json", workdir=qworkdir)
    assert bad.returncode == 2
    assert json.loads(bad.stdout)["error"]["errors"][0]["path"] == "train.lr"

    status = status_doc(redis_url, qworkdir)
    assert status["queues"] == [
        {"name": "infra", "queued": 2, "started": 0, "finished": 0, "failed": 0, "deferred": 0, "scheduled": 0}
    ]
    job = job_of(redis_url, doc["job_id"])
    assert job.timeout == -1  # no job timeout for training
    assert job.func_name == "runner.queue.job.execute_plan" and job.kwargs == {}
    (plan_sent,) = job.args  # the plan's canonical document: defaults filled in, the id fixed
    assert plan_sent["experiment_id"] == doc["job_id"] and plan_sent["train"]["lr"] == 0.001
    assert plan_sent["data"]["db"] == str(qworkdir / "data" / "blat.db")  # absolute, as the workers see it


def test_submit_id_is_the_experiment_id_for_an_explicit_one(redis_url, qworkdir):
    plan = plan_file(qworkdir, "named")
    result = cli("submit", str(plan), "--redis", redis_url, "--set", "experiment_id=my-exp-1", workdir=qworkdir)
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
    from runner.queue.connection import redact

    assert redact("rediss://user:pw@host:6380/1") == "rediss://user:***@host:6380/1"
    assert redact("redis://host:6379/0") == "redis://host:6379/0"


def test_gpu_slots():
    from runner.errors import UsageError
    from runner.plan.models import GpuRequest
    from runner.queue.pool import gpu_slots

    assert gpu_slots("0,1") == ["0", "1"]
    assert gpu_slots(None) == [None]
    with pytest.raises(UsageError, match="device ids"):
        gpu_slots("0,0")
    # a worker's slot "1" is device 1, never a count of one GPU
    assert GpuRequest.parse("1", devices_only=True).engine_value() == "1"
    assert GpuRequest.parse("1").engine_value() == 1


def test_exposure_warning_only_for_open_urls():
    from runner.queue.connection import exposure_warning

    for url in (
        "redis://127.0.0.1:6379/0",
        "redis://127.8.9.10:6379/0",
        "redis://localhost:6379/0",
        "redis://[::1]:6379/0",
        "unix:///run/redis/redis.sock?db=0",
        "redis://:secret@redis.example.org:6379/0",
        "redis://infra:secret@10.0.0.5:6379/0",
        "rediss://10.0.0.5:6380/0?ssl_certfile=/etc/infra/client.pem",
    ):
        assert exposure_warning(url) is None, url
    assert exposure_warning("redis://example.invalid:6379/0") == (
        "Redis at redis://example.invalid:6379/0 has no credentials and is not on this machine: anyone who can "
        "reach it can run plans on this worker; use a password or ACL user (redis://USER:PASSWORD@HOST), "
        "rediss:// for TLS, and bind Redis to a private interface (see docs/security.md)"
    )
    for url in ("rediss://10.0.0.5:6380/0", "redis://infra@10.0.0.5:6379/0", "redis://0.0.0.0:6379/0"):
        assert exposure_warning(url), url


def test_worker_warns_about_an_open_redis_url_first(qworkdir):
    # a missing --workdir fails before any connection: nothing is sent to example.invalid, not even DNS.
    missing = qworkdir / "missing"
    error = f"infra: error: --workdir {missing} is not a directory; create it or use 'infra init {missing}'"
    result = infra("worker", "--redis", "redis://example.invalid:6379/0", "--workdir", str(missing), workdir=qworkdir)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "infra: warning: Redis at redis://example.invalid:6379/0 has no credentials and is not on this machine: "
        "anyone who can reach it can run plans on this worker; use a password or ACL user "
        "(redis://USER:PASSWORD@HOST), rediss:// for TLS, and bind Redis to a private interface "
        "(see docs/security.md)",
        error,
    ]
    local = infra(
        "worker", "--redis", f"redis://127.0.0.1:{_free_port()}/0", "--workdir", str(missing), workdir=qworkdir
    )
    assert local.returncode == 2 and local.stderr.splitlines() == [error]


# --- the job guard: only infra's job function runs ------------------------------------------------

HOSTILE_MODULE = (
    "from pathlib import Path\n"
    "Path(__file__).with_name('imported.marker').touch()\n\n\n"
    "def boom(*args, **kwargs):\n"
    "    Path(__file__).with_name('called.marker').touch()\n"
)
JOB_FUNC = "runner.queue.job.execute_plan"


def test_worker_refuses_every_job_but_its_own_and_runs_nothing(redis_url, qworkdir, tmp_path):
    import redis
    from rq import Queue, Retry
    from rq.callbacks import Callback
    from rq.serializers import JSONSerializer

    marker = tmp_path / "pwned"
    (qworkdir / "hostile.py").write_text(HOSTILE_MODULE)
    # Control: the worker's working directory is on its import path, so a job naming `hostile.boom`
    # would import (and mark) it if the worker resolved job functions by name.
    probe = subprocess.run([sys.executable, "-c", "import hostile"], cwd=qworkdir, capture_output=True, text=True)
    assert probe.returncode == 0 and (qworkdir / "imported.marker").exists(), probe.stderr
    (qworkdir / "imported.marker").unlink()

    conn = redis.Redis.from_url(redis_url)
    queue = Queue("infra", connection=conn, serializer=JSONSerializer)  # what any Redis client can do
    db = str(qworkdir / "data" / "blat.db")
    # First in line, a job record RQ itself cannot read (a date that is not one): failed, not fatal.
    queue.enqueue("os.system", args=(f"touch {marker}",), job_id="h-record")
    conn.hset("rq:job:h-record", "created_at", "yesterday")

    def plan(job_id: str, **extra) -> dict:
        return {"name": "guard", "data": {"db": db}, "model": {"name": "linear"}, "experiment_id": job_id, **extra}

    expected = {}  # job id → the last line of its failure

    def hostile(job_id: str, func: str, reason: str, args=(), kwargs=None, **options) -> None:
        queue.enqueue(func, args=args, kwargs=kwargs, job_id=job_id, **options)
        expected[job_id] = f"runner.queue.job.JobRefused: job {job_id} refused: {reason}; nothing was run"

    not_ours = "is not infra's job function runner.queue.job.execute_plan"
    hostile("h-os-system", "os.system", f"function 'os.system' {not_ours}", (f"touch {marker}",), retry=Retry(3))
    hostile("h-subprocess", "subprocess.call", f"function 'subprocess.call' {not_ours}", (["touch", str(marker)],))
    hostile("h-exec", "builtins.exec", f"function 'builtins.exec' {not_ours}", (f"open({str(marker)!r}, 'w')",))
    hostile("h-module", "hostile.boom", f"function 'hostile.boom' {not_ours}")
    hostile("h-other", "runner.run.launch.run", f"function 'runner.run.launch.run' {not_ours}", ({},))
    hostile(
        "h-kwargs",
        JOB_FUNC,
        f"{JOB_FUNC} takes no keyword arguments, the job has ['command']",
        (plan("h-kwargs"),),
        {"command": f"touch {marker}"},
    )
    hostile(
        "h-two-args",
        JOB_FUNC,
        f"{JOB_FUNC} takes exactly one argument, a plan object; the job has [{{'name': 'x'}}, 'rm -rf /']",
        ({"name": "x"}, "rm -rf /"),
    )
    hostile("h-text", JOB_FUNC, f"{JOB_FUNC} takes exactly one argument, a plan object; the job has ['x']", ("x",))
    hostile(
        "h-callbacks",
        JOB_FUNC,
        "the job asks for a success callback 'hostile.boom'; infra jobs have none",
        (plan("h-callbacks"),),
        on_success=Callback("hostile.boom"),
        on_failure=Callback("hostile.boom"),
    )
    hostile(
        "h-other-id",
        JOB_FUNC,
        "its plan's experiment_id 'someone-else' is not the job id; submit with 'infra submit'",
        (plan("someone-else"),),
    )
    # Payloads no client library would write: an instance binding, bytes that are not JSON.
    hostile("h-instance", JOB_FUNC, f"the job binds {JOB_FUNC} to an instance ({{'x': 1}})", (plan("h-instance"),))
    conn.hset("rq:job:h-instance", "data", json.dumps([JOB_FUNC, {"x": 1}, [plan("h-instance")], {}]))
    queue.enqueue(JOB_FUNC, args=(plan("h-garbage"),), job_id="h-garbage")
    conn.hset("rq:job:h-garbage", "data", b"\x80\x04 not json")
    big = 2 * 1024 * 1024
    queue.enqueue(JOB_FUNC, args=({"name": "x" * big},), job_id="h-oversized")
    queue.enqueue(JOB_FUNC, args=(plan("h-bad-plan", train={"lr": -1}),), job_id="h-bad-plan")
    # Probes of the worker's filesystem (issue 23): a missing path, a file that is not SQLite.
    probes = {"h-probe-missing": str(tmp_path / "no-such.db"), "h-probe-passwd": "/etc/passwd"}
    for job_id, path in probes.items():
        queue.enqueue(JOB_FUNC, args=({**plan(job_id), "data": {"db": path}},), job_id=job_id)

    worker = infra(
        "worker",
        "--redis",
        redis_url,
        "--backend",
        "local",
        "--burst",
        "--name",
        "guard",
        workdir=qworkdir,
        timeout=300,
    )
    assert worker.returncode == 0, worker.stderr[-3000:]  # refusing a job never takes the worker down
    assert not marker.exists()
    assert not (qworkdir / "imported.marker").exists() and not (qworkdir / "called.marker").exists()
    assert not (qworkdir / "experiments").exists()  # no job got as far as the run path

    failures = {}
    for job_id in [*expected, "h-garbage", "h-oversized", "h-bad-plan"]:
        job = job_of(redis_url, job_id)
        assert job.get_status() == "failed", job_id
        failures[job_id] = job.latest_result().exc_string.strip()
    for job_id, last_line in expected.items():
        assert failures[job_id].splitlines()[-1] == last_line, job_id
        assert f"refused job {job_id}: " in worker.stderr  # logged by the worker too
    assert job_of(redis_url, "h-os-system").retries_left == 0  # a refusal is not retried
    assert failures["h-garbage"].splitlines()[-1] == (
        "runner.queue.job.PayloadRefused: job h-garbage refused: its payload is not a JSON job (UnicodeDecodeError: "
        "'utf-8' codec can't decode byte 0x80 in position 0: invalid start byte); nothing was run"
    )
    size = len(json.dumps([JOB_FUNC, None, [{"name": "x" * big}], {}]))
    assert failures["h-oversized"].splitlines()[-1] == (
        f"runner.queue.job.PayloadRefused: job h-oversized refused: its payload of {size} bytes is over infra's "
        "limit of 1048576 bytes; nothing was run"
    )
    assert "refused job h-garbage: " in worker.stderr and "refused job h-oversized: " in worker.stderr
    assert conn.hget("rq:job:h-record", "status") == b"failed"  # read raw: RQ cannot load this record
    assert conn.zscore("rq:failed:infra", "h-record") is not None
    assert conn.hget("rq:job:h-record", "exc_info").decode() == (
        "job h-record refused: its record cannot be read (ValueError: time data 'yesterday' does not match format "
        "'%Y-%m-%dT%H:%M:%SZ'); nothing was run"
    )
    assert failures["h-bad-plan"].splitlines()[-1] == "runner.errors.PlanError: job h-bad-plan: train.lr: must be > 0"
    for job_id, path in probes.items():  # the same answer for both: nothing to tell them apart
        answer = job_of(redis_url, job_id).latest_result().exc_string.strip().splitlines()[-1]
        assert answer == (
            f"runner.errors.PlanError: job {job_id}: data.db: not a mutation database this worker can use "
            "(the reason is in the worker's log)"
        )
        assert path in worker.stderr  # the node owner still sees why


def test_a_study_plan_is_refused_by_submit_and_by_the_worker_before_anything_exists(redis_url, qworkdir):
    """`split.fold: "all"` is a study (one experiment per fold), a job is one experiment: `infra submit`
    refuses it before anything is enqueued, and a worker refuses such a job put on the queue by another
    client before any experiment exists (before, the job created an experiment the core then refused)."""
    import redis
    from rq import Queue
    from rq.serializers import JSONSerializer

    from runner.queue.submit import FOLD_ALL_PROBLEM

    plan = plan_file(qworkdir, "cv")
    study = ("--set", "split.fold=all", "--set", "split.n_folds=3")
    result = cli("submit", str(plan), "--redis", redis_url, *study, workdir=qworkdir)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == f"infra: error: {plan}: split.fold: {FOLD_ALL_PROBLEM}"
    assert "'infra run PLAN --submit'" in FOLD_ALL_PROBLEM
    assert status_doc(redis_url, qworkdir)["queues"] == []  # nothing enqueued

    doc = {"name": "cv", "data": {"db": str(qworkdir / "data" / "blat.db")}, "model": {"name": "linear"},
           "split": {"strategy": "random", "n_folds": 3, "fold": "all"}, "experiment_id": "h-cv"}  # fmt: skip
    Queue("infra", connection=redis.Redis.from_url(redis_url), serializer=JSONSerializer).enqueue(
        JOB_FUNC, args=(doc,), job_id="h-cv"
    )
    worker = infra("worker", "--redis", redis_url, "--backend", "local", "--burst", "--name", "cv",
                   workdir=qworkdir, timeout=300)  # fmt: skip
    assert worker.returncode == 0, worker.stderr[-3000:]
    job = job_of(redis_url, "h-cv")
    assert job.get_status() == "failed"
    assert job.latest_result().exc_string.strip().splitlines()[-1] == (
        f"runner.errors.PlanError: job h-cv: split.fold: {FOLD_ALL_PROBLEM}"
    )
    assert not (qworkdir / "experiments").exists()


@pytest.mark.core
def test_a_warm_worker_refuses_an_unknown_component_before_the_experiment_exists(redis_url, qworkdir):
    """The warm lane checks the plan's components against what the image registers, as `infra run` and
    a study do: a misspelt model is refused with "did you mean", and no experiment folder is made."""
    job_id = submit_plan(redis_url, qworkdir, plan_file(qworkdir, "typo", model={"name": "lineer"}))
    worker = infra("worker", "--redis", redis_url, "--backend", "local", "--burst", "--name", "typo",
                   workdir=qworkdir, timeout=300)  # fmt: skip
    assert worker.returncode == 0, worker.stderr[-3000:]
    job = job_of(redis_url, job_id)
    assert job.get_status() == "failed"
    last = job.latest_result().exc_string.strip().splitlines()[-1]
    assert last.startswith("runner.errors.PlanError: ") and "model.name" in last and "'linear'" in last, last
    assert not (qworkdir / "experiments" / job_id).exists()


def test_execute_plan_is_the_name_the_guard_allows():
    from runner.queue import job

    assert f"{job.execute_plan.__module__}.{job.execute_plan.__qualname__}" == job.JOB_FUNC == JOB_FUNC


# --- queue status reads untrusted documents --------------------------------------------------------


def test_status_skips_what_infra_did_not_write(redis_url, qworkdir):
    import redis

    conn = redis.Redis.from_url(redis_url)
    good = {"worker": "w\x1b[31mred", "state": "busy", "current_job": None, "heartbeat_at": None, "queues": ["infra"]}
    conn.set("infra:node:h:1", b"not json{")
    conn.set("infra:node:h:2", "[1, 2]")
    conn.set("infra:node:h:3", json.dumps({**good, "worker": ["x"]}))
    conn.hset("infra:node:h:4", "worker", "x")
    conn.set("infra:node:h:5", "x" * 70_000)
    conn.set("infra:node:h:6", json.dumps(good))
    conn.sadd("rq:queues", "not-a-queue-key")
    conn.sadd("rq:workers", "rq:worker:broken")
    conn.hset("rq:worker:broken", mapping={"last_heartbeat": "yesterday", "queues": "infra"})

    result = cli("queue", "status", "--redis", redis_url, "--json", workdir=qworkdir)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert sorted(doc["notes"]) == [
        "heartbeat infra:node:h:1: not JSON; skipped",
        "heartbeat infra:node:h:2: a JSON list, not an object; skipped",
        "heartbeat infra:node:h:3: 'worker' is missing or not str; skipped",
        "heartbeat infra:node:h:4: cannot be read as a document "
        "(WRONGTYPE Operation against a key holding the wrong kind of value); skipped",
        "heartbeat infra:node:h:5: 70000 bytes, over 65536; skipped",
        "queue key 'not-a-queue-key' in rq:queues is not an RQ queue; skipped",
        doc["notes"][-1],
    ]
    assert doc["notes"][-1].startswith("worker record rq:worker:broken: unreadable (")
    assert [w["name"] for w in doc["workers"]] == ["w\x1b[31mred"] and doc["workers"][0]["alive"] is True

    human = cli("queue", "status", "--redis", redis_url, workdir=qworkdir)
    assert human.returncode == 0, human.stderr
    assert "\x1b" not in human.stdout and "w?[31mred" in human.stdout  # no escape sequence reaches the terminal
    assert "infra: note: heartbeat infra:node:h:1: not JSON; skipped" in human.stderr.splitlines()


# --- end to end: real workers, real training -------------------------------------------------------


def test_a_heartbeat_before_the_workers_birth_does_not_take_its_name(redis_url, tmp_path):
    """The heartbeat thread starts before RQ registers the worker; its first beat must not create RQ's
    worker hash, or register_birth refuses the worker's own name ("an active worker named … already")."""
    from redis import Redis

    from runner.queue.connection import queue, serializer
    from runner.queue.job import InfraJob
    from runner.queue.worker import Heartbeat, InfraWorker, WorkerConfig
    from runner.run.backends import backend_for

    conn = Redis.from_url(redis_url)
    cfg = WorkerConfig(redis_url=redis_url, workdir=tmp_path, backend=backend_for("local"), name="early-beat")
    worker = InfraWorker(
        [queue(conn, "infra", job_class=InfraJob)], connection=conn, name=cfg.name, serializer=serializer(),
        job_class=InfraJob,
    )  # fmt: skip
    beat = Heartbeat(worker, cfg)
    beat.beat()  # what the thread does first, here before the birth, deterministically
    assert conn.exists(beat.key)  # infra's node document is published at once
    worker.register_birth()  # raised ValueError before the fix
    beat.beat()
    assert conn.hget(worker.key, "last_heartbeat") is not None  # after the birth, RQ's heartbeat runs
    worker.register_death()
    conn.delete(beat.key)


def test_the_command_listener_wakes_every_second_so_a_burst_worker_exits_promptly(redis_url):
    """RQ's listener thread blocks up to 60 s per read, and redis-py joins it without a timeout: about one
    `infra worker --burst` in ten took a minute to exit (seen in benchmarks/bench_study.py --queue)."""
    from redis import Redis

    from runner.queue.connection import queue, serializer
    from runner.queue.job import InfraJob
    from runner.queue.worker import InfraWorker

    conn = Redis.from_url(redis_url)
    worker = InfraWorker([queue(conn, "infra", job_class=InfraJob)], connection=conn, name="listener",
                         serializer=serializer(), job_class=InfraJob)  # fmt: skip
    worker.subscribe()
    assert worker.pubsub_thread.is_alive() and worker.pubsub_thread.sleep_time <= 1.0
    worker.unsubscribe()
    assert not worker.pubsub_thread.is_alive()


@pytest.mark.core  # trains with the local backend
@pytest.mark.slow
def test_two_workers_ten_plans_each_experiment_runs_once(redis_url, qworkdir, tmp_path):
    gate = tmp_path / "gate-open"  # one gate for every job: each worker is held on its first job
    ids = []
    for seed in range(9):
        plan = plan_file(
            qworkdir,
            f"ten-{seed}",
            model={"name": "gate", "params": {"after_checkpoint": False, "gate_file": str(gate)}},
            seed=seed,
        )
        ids.append(submit_plan(redis_url, qworkdir, plan))
    dup = cli("submit", str(qworkdir / "ten-4.json"), "--redis", redis_url, "--json", workdir=qworkdir)
    assert json.loads(dup.stdout)["duplicate"] is True
    assert len(set(ids)) == 9

    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
    workers = [
        start_worker(redis_url, qworkdir, f"w{i}", "--backend", "local", "--burst", "--heartbeat-ttl", "6", log=logs[i])
        for i in range(2)
    ]
    try:
        # Both workers hold a job at the gate: both are alive, busy, on different jobs, heartbeating.
        # Only this test's workers count (a worker of an earlier test may still be shutting down).
        last: list[dict] = []

        def both_held():
            doc = status_doc(redis_url, qworkdir)
            last[:] = [doc]
            held = [w for w in doc["workers"] if w["name"] in ("w0", "w1") and w["alive"] and w["current_job"]]
            return doc if len(held) == 2 and held[0]["current_job"] != held[1]["current_job"] else None

        try:
            seen = wait_for(both_held, 120, "two live workers, each holding a job")
        except AssertionError:
            raise AssertionError(
                f"{last[-1] if last else 'no status'}\n" + "\n".join(p.read_text()[-1500:] for p in logs if p.exists())
            ) from None
        seen = {**seen, "workers": [w for w in seen["workers"] if w["name"] in ("w0", "w1")]}
        node = seen["workers"][0]["node"]
        assert node["cpus"] >= 1 and node["memory"]["total_bytes"] > 0 and "free_bytes" in node["disk"]
        assert node["ttl_left_s"] <= 6 and seen["notes"] == []
        gate.touch()
        for proc in workers:
            assert proc.wait(timeout=300) == 0, [p.read_text()[-2000:] for p in logs]
    finally:
        for proc in workers:
            kill_group(proc)
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
        events = events_of(qworkdir / "experiments" / exp_id)
        assert sum(1 for e in events if e.get("state") == "created") == 1  # ran exactly once
    assert ran_on == {"w0", "w1"}


@pytest.mark.core  # trains with the local backend
@pytest.mark.slow
def test_sigkilled_worker_job_resumes_from_checkpoint_on_another(redis_url, qworkdir, tmp_path):
    exp_id = submit_plan(redis_url, qworkdir, gated_plan(qworkdir, "killed"))
    exp_dir = qworkdir / "experiments" / exp_id
    ttl = "3"
    first = start_worker(
        redis_url, qworkdir, "doomed", "--backend", "local", "--heartbeat-ttl", ttl, log=tmp_path / "a.log"
    )
    second = None
    try:
        # Held after its first epoch, with ckpts/last.ckpt written.
        wait_for(lambda: (exp_dir / "metrics" / ".gate-waiting").exists(), 180, "the training to wait at the gate")
        assert (exp_dir / "ckpts" / "last.ckpt").exists()
        second = start_worker(
            redis_url, qworkdir, "rescuer", "--backend", "local", "--heartbeat-ttl", ttl, log=tmp_path / "b.log"
        )
        wait_for(lambda: len(status_doc(redis_url, qworkdir)["workers"]) == 2, 60, "the second worker")
        # The node dies: the worker and the training it runs (its warm slot's process) are SIGKILLed.
        record = json.loads((exp_dir / "status.json").read_text())
        training_pid = int(record["slot"]["process"])
        os.killpg(first.pid, signal.SIGKILL)
        os.killpg(training_pid, signal.SIGKILL)
        first.wait(timeout=10)
        epochs_before = epoch_events(exp_dir)
        (exp_dir / "metrics" / ".gate-open").touch()  # the next attempt runs through

        job = wait_for(
            lambda: (lambda j: j if j.get_status() in ("finished", "failed") else None)(job_of(redis_url, exp_id)),
            180,
            "the job to finish on the other worker",
        )
        assert job.get_status() == "finished", (tmp_path / "b.log").read_text()[-3000:]
        result = job.return_value()
        assert result["state"] == "succeeded" and result["worker"] == "rescuer" and result["attempt"] == 2
        assert any(e.get("phase") == "resume" for e in events_of(exp_dir)), "attempt 2 did not resume from last.ckpt"
        assert epochs_before >= 1 and epoch_events(exp_dir) < epochs_before + 3  # it did not start over
        assert "AbandonedJobError" not in json.dumps(result)
        second.send_signal(signal.SIGTERM)  # idle: the first SIGTERM stops it at once
        assert second.wait(timeout=30) == 0
    finally:
        kill_group(first)
        kill_group(second)


@pytest.mark.core  # trains with the local backend
@pytest.mark.slow
def test_second_sigterm_checkpoints_and_requeues(redis_url, qworkdir, tmp_path):
    exp_id = submit_plan(redis_url, qworkdir, gated_plan(qworkdir, "stopped"))
    exp_dir = qworkdir / "experiments" / exp_id
    log = tmp_path / "w.log"
    proc = start_worker(redis_url, qworkdir, "stopper", "--backend", "local", log=log)
    try:
        wait_for(lambda: (exp_dir / "metrics" / ".gate-waiting").exists(), 180, "the training to wait at the gate")
        proc.send_signal(signal.SIGTERM)  # warm shutdown: would finish the job
        wait_for(lambda: "warm shut down requested" in log.read_text(), 30, "the warm shutdown")
        # RQ swaps in the second-signal handler before it logs the warm shutdown.
        proc.send_signal(signal.SIGTERM)  # cold: the run path stops the training (SIGTERM opens the gate)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        kill_group(proc)
    record = json.loads((exp_dir / "status.json").read_text())
    assert record["state"] == "cancelled" and (exp_dir / "ckpts" / "last.ckpt").exists()
    assert any(e.get("phase") == "cancelled" for e in events_of(exp_dir)), "the core did not checkpoint on SIGTERM"
    assert job_of(redis_url, exp_id).get_status() == "queued"
    assert "Logging error" not in log.read_text()

    (exp_dir / "metrics" / ".gate-open").touch()
    again = start_worker(redis_url, qworkdir, "finisher", "--backend", "local", "--burst", log=tmp_path / "w2.log")
    try:
        assert again.wait(timeout=300) == 0, (tmp_path / "w2.log").read_text()[-3000:]
    finally:
        kill_group(again)
    result = job_of(redis_url, exp_id).return_value()
    assert result["state"] == "succeeded" and result["attempt"] == 2
    assert any(e.get("phase") == "resume" for e in events_of(exp_dir))


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
    exp_id = submit_plan(redis_url, workdir, plan)
    env = {**os.environ, **BASE_ENV, "INFRA_WORKDIR": str(workdir), "PYTHONUNBUFFERED": "1"}
    env.pop("XDG_CONFIG_HOME", None)
    cmd = [*INFRA, "worker", "--redis", redis_url, "--backend", "docker", "--burst", "--name", "dw"]
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


@pytest.mark.core
@pytest.mark.slow
def test_a_worker_keeps_a_warm_slot_between_jobs_of_one_image(redis_url, qworkdir, tmp_path):
    """Two jobs of the same image and database run in one slot process (one start-up); with
    --isolated each job has a process of its own. The two workers take their own queues at the same
    time (each of them waits on process start-ups, most of it one core's work)."""
    warm_ids = [
        submit_plan(redis_url, qworkdir, plan_file(qworkdir, f"warm{seed}", seed=seed), "--queue", "warm")
        for seed in (0, 1)
    ]
    cold_ids = [
        submit_plan(redis_url, qworkdir, plan_file(qworkdir, f"cold{seed}", seed=seed), "--queue", "cold")
        for seed in (0, 1)
    ]
    logs = {"warm": tmp_path / "w.log", "cold": tmp_path / "c.log"}
    workers = {
        "warm": start_worker(redis_url, qworkdir, "warm", "--backend", "local", "--burst", "--queue", "warm",
                             log=logs["warm"]),
        "cold": start_worker(redis_url, qworkdir, "cold", "--backend", "local", "--burst", "--queue", "cold",
                             "--isolated", log=logs["cold"]),
    }  # fmt: skip
    try:
        for name, proc in workers.items():
            assert proc.wait(timeout=600) == 0, logs[name].read_text()[-3000:]
    finally:
        for proc in workers.values():
            kill_group(proc)

    records = [json.loads((qworkdir / "experiments" / i / "status.json").read_text()) for i in warm_ids]
    assert [r["state"] for r in records] == ["succeeded", "succeeded"]
    assert records[0]["slot"]["process"] == records[1]["slot"]["process"]  # the same warm slot
    assert [r["slot"]["seq"] for r in records] == [1, 2]

    records = [json.loads((qworkdir / "experiments" / i / "status.json").read_text()) for i in cold_ids]
    assert [r["state"] for r in records] == ["succeeded", "succeeded"]
    assert all(r.get("slot") is None and r["pid"] for r in records) and records[0]["pid"] != records[1]["pid"]
