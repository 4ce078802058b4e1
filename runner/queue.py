"""Scale-out over Redis with RQ (DESIGN §9): submit plans, run workers, read the queue's state.

    infra submit  → validate locally → experiment id → RQ job (job id = experiment id, no timeout)
    infra worker  → an RQ `SimpleWorker` whose job function is `execute_plan` → `runner.run.launch.run`

Decisions (see docs/queue.md):

- The submitter fixes the experiment id: the plan's `experiment_id`, else the id derived from the
  resolved plan, the database identity and the submitter's workdir plugins (`local_image_hash`, no
  Docker needed). It is written into the enqueued plan, so every worker uses exactly that id
  whatever its image hash. `data.db` is resolved to an absolute path by the submitter and must be
  valid on the workers (a shared filesystem), as must the workdir holding `experiments/`.
- A duplicate (same id queued, started, deferred or finished) is reported, not enqueued; a failed
  or stopped job of that id is replaced, and its experiment resumes from its checkpoint. Submitters
  serialise on a short Redis lock per id.
- Workers use RQ's `SimpleWorker`: the job runs in the worker process (the training itself is a
  container or a separate process anyway), so `SIGKILL` of the worker really kills the job's runner.
- Heartbeats: a thread in every worker writes `infra:node:<host>:<worker>` (the node's resources,
  TTL = `heartbeat_ttl`) and keeps the running job's entry in RQ's StartedJobRegistry alive for the
  same TTL. A dead worker's entry expires; the next cleanup (any live worker runs RQ's own
  `StartedJobRegistry.cleanup` each beat, one at a time via a Redis lock) retries the abandoned job,
  which resumes from `ckpts/last.ckpt` on whichever worker takes it.
- Signals: the first SIGTERM/SIGINT is RQ's warm shutdown (finish the current job, take no more);
  the second stops the training gracefully (`launch.stop_experiment` via the run path's Ctrl-C
  handling: checkpoint, `cancelled`), puts the job back at the front of its queue and exits.
- Retries are spent only on abandoned jobs; a training that fails is a failed job (not retried).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from runner.errors import EnvironmentProblem, Interrupted, UsageError

log = logging.getLogger(__name__)

DEFAULT_QUEUE = "infra"
JOB_FUNC = "runner.queue.execute_plan"
NODE_KEY_PREFIX = "infra:node:"
SUBMIT_LOCK = "infra:submit-lock:{}"
CLEANUP_LOCK = "infra:cleanup-lock:{}"
RESULT_TTL_S = 30 * 86400  # a finished job (and so the duplicate check) is kept for 30 days
DEFAULT_RETRIES = 3
DEFAULT_HEARTBEAT_TTL = 60
PENDING = ("queued", "started", "deferred", "scheduled", "created")


# --- connection -----------------------------------------------------------------------------------


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def connect(url: str, retries: int = 3):
    """A redis-py client for `redis://` or `rediss://` (TLS) URLs, password included.

    Commands are retried `retries` times with exponential backoff (0.2 s doubling, capped at 10 s)
    on connection loss; a server that still does not answer raises EnvironmentProblem (exit 3).
    Workers ask for more retries (and RQ's own loop retries on top: a worker outlives a Redis restart).
    """
    import redis
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise UsageError(f"--redis {redact(url)}: use a redis://, rediss:// (TLS) or unix:// URL")
    try:
        conn = redis.Redis.from_url(
            url,
            retry=Retry(ExponentialBackoff(cap=10, base=0.2), retries),
            retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
            socket_connect_timeout=5,
            socket_keepalive=True,
            health_check_interval=30,
        )
        conn.ping()
    except redis.exceptions.AuthenticationError as exc:
        raise EnvironmentProblem(
            f"Redis at {redact(url)} refused the credentials ({exc}); check the URL's password"
        ) from None
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
        raise EnvironmentProblem(
            f"Redis at {redact(url)} is not reachable ({exc}); start redis-server or fix --redis"
        ) from None
    except ValueError as exc:
        raise UsageError(f"--redis {redact(url)}: {exc}") from None
    return conn


def _serializer():
    from rq.serializers import JSONSerializer

    return JSONSerializer  # plans and results are JSON; nothing is unpickled from Redis


def _queue(conn, name: str):
    from rq import Queue

    return Queue(name, connection=conn, serializer=_serializer())


# --- submit ---------------------------------------------------------------------------------------


def submission_id(resolved: dict, workdir: Path | None) -> str:
    """The experiment id a submitted plan runs under (see the module docstring)."""
    from runner.run.launch import local_image_hash
    from runner.run.records import derive_experiment_id

    if resolved.get("experiment_id"):
        return resolved["experiment_id"]
    if workdir is not None:
        plugins = local_image_hash(workdir)
    else:
        from runner.images import builds

        plugins = builds.context_hash([], {"backend": "queue"})
    return derive_experiment_id(resolved, plugins)


def submit(
    conn, resolved: dict, workdir: Path | None, queue_name: str = DEFAULT_QUEUE, retries: int = DEFAULT_RETRIES
) -> dict:
    """Enqueue a validated, resolved plan once; a duplicate is reported instead.

    Returns {"job_id", "experiment_id", "queue", "status", "duplicate", "replaced"}.
    """
    from rq import Retry
    from rq.exceptions import NoSuchJobError
    from rq.job import Job

    from runner.run.records import now_iso

    exp_id = submission_id(resolved, workdir)
    plan = {**resolved, "experiment_id": exp_id}
    lock = SUBMIT_LOCK.format(exp_id)
    token = uuid.uuid4().hex
    deadline = time.monotonic() + 15
    while not conn.set(lock, token, nx=True, px=10_000):
        if time.monotonic() > deadline:
            raise EnvironmentProblem(f"submission lock {lock} held for over 15 s; retry, or delete the key if stale")
        time.sleep(0.05)
    try:
        replaced = False
        try:
            job = Job.fetch(exp_id, connection=conn, serializer=_serializer())
            status = _status(job)
        except NoSuchJobError:
            job, status = None, None
        if job is not None and status in (*PENDING, "finished"):
            return _submitted(exp_id, job.origin, status, duplicate=True)
        if job is not None:  # failed, stopped or canceled: replace it; the experiment resumes
            job.delete()
            replaced = True
        job = _queue(conn, queue_name).enqueue(
            JOB_FUNC,
            args=(plan,),
            job_id=exp_id,
            job_timeout=-1,  # training has no time limit
            result_ttl=RESULT_TTL_S,
            retry=Retry(max=retries) if retries > 0 else None,
            description=f"{plan['name']} ({exp_id})",
            meta={"submitted_by": socket.gethostname(), "submitted_at": now_iso(), "experiment_id": exp_id},
        )
        return _submitted(exp_id, queue_name, _status(job), duplicate=False, replaced=replaced)
    finally:
        if conn.get(lock) == token.encode():
            conn.delete(lock)


def _submitted(exp_id: str, queue: str, status: str | None, duplicate: bool, replaced: bool = False) -> dict:
    return {
        "job_id": exp_id,
        "experiment_id": exp_id,
        "queue": queue,
        "status": status,
        "duplicate": duplicate,
        "replaced": replaced,
    }


def _status(job) -> str | None:
    status = job.get_status(refresh=True)
    return status.value if hasattr(status, "value") else status


# --- the job --------------------------------------------------------------------------------------


@dataclass
class WorkerConfig:
    """How one worker process runs its jobs (flag → default, resolved once by the CLI)."""

    redis_url: str
    workdir: Path
    queues: list[str] = field(default_factory=lambda: [DEFAULT_QUEUE])
    gpus: str | None = None  # this worker's GPU slot: a device id list "1" / "0,1", "all", "none" or None (plan)
    backend: str = "docker"
    burst: bool = False
    name: str | None = None
    heartbeat_ttl: int = DEFAULT_HEARTBEAT_TTL
    stop_timeout: int = 60

    @property
    def heartbeat_interval(self) -> float:
        return max(0.5, self.heartbeat_ttl / 3)

    def run_gpus(self):
        """The `RunOptions.gpus` of this slot: device ids stay device ids (never read as a count)."""
        if self.gpus is None or self.gpus in ("all", "none"):
            return self.gpus
        return [d.strip() for d in self.gpus.split(",") if d.strip()]


_context: WorkerConfig | None = None  # set by run_worker: the job function runs in the worker process


def execute_plan(plan: dict) -> dict:
    """RQ job function: run a submitted plan through `runner.run.launch.run` in the foreground.

    Returns the experiment's final state and metrics summary (the job's result). A failed training
    raises (a failed job); a stop raises Interrupted.
    """
    from runner.plan.load import load_plan
    from runner.run.launch import RunOptions, run

    cfg = _context
    if cfg is None:
        raise UsageError("execute_plan runs inside 'infra worker' only")
    exp_id = plan.get("experiment_id")
    started = time.monotonic()
    loaded = load_plan(f"job {exp_id}", [], workdir=cfg.workdir, text=json.dumps(plan))

    def on_event(event: dict) -> None:
        if event.get("event") in ("state", "reused", "attached"):
            log.info("job %s: %s %s", exp_id, event.get("event"), event.get("state"))

    opts = RunOptions(
        backend=cfg.backend,
        gpus=cfg.run_gpus(),
        detach=False,
        stop_timeout=cfg.stop_timeout,
        on_log=lambda line: log.debug("%s | %s", exp_id, line),
        on_event=on_event,
    )
    run_started = time.monotonic()
    try:
        outcome = run(loaded, cfg.workdir, opts)
    except KeyboardInterrupt:  # a second signal outside the follow loop (building, starting)
        raise Interrupted(f"job {exp_id} interrupted by the worker's shutdown") from None
    run_seconds = time.monotonic() - run_started
    return {
        **outcome.to_dict(),
        "attached": outcome.attached,
        "worker": cfg.name,
        "host": socket.gethostname(),
        "seconds": round(time.monotonic() - started, 3),
        "run_seconds": round(run_seconds, 3),  # inside runner.run.launch.run: what `infra run` would spend
        **_metrics(outcome.exp_dir),
    }


def _metrics(exp_dir: Path) -> dict:
    try:
        metrics = json.loads((Path(exp_dir) / "metrics" / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}
    return {"test": metrics.get("test"), "val": metrics.get("val"), "n": metrics.get("n")}


# --- the worker -----------------------------------------------------------------------------------


def _worker_class():
    from rq import SimpleWorker

    class InfraWorker(SimpleWorker):
        """RQ's in-process worker with a graceful two-stage stop (see the module docstring)."""

        force_stopping = False

        def request_force_stop(self, signum, frame):
            if self.get_current_job_id() is None:
                raise SystemExit(0)
            if self.force_stopping:
                return
            self.force_stopping = True
            self.log.warning(
                "Worker %s: second stop signal: stopping job %s (checkpoint), putting it back on the queue",
                self.name,
                self.get_current_job_id(),
            )
            # The run path turns Ctrl-C into a graceful stop of the training (checkpoint, `cancelled`).
            raise KeyboardInterrupt

    return InfraWorker


def _retry_policy(job, exc_type, exc_value, traceback) -> bool:
    """Exception handler: spend retries on abandoned jobs only; requeue a job stopped by shutdown."""
    from rq.exceptions import AbandonedJobError

    worker = _current_worker
    if exc_type is AbandonedJobError:
        return True
    if worker is not None and worker.force_stopping and issubclass(exc_type, Interrupted | KeyboardInterrupt):
        job.retries_left = (job.retries_left or 0) + 1  # requeue without spending a retry
        return True
    job.retries_left = 0
    return True


_current_worker = None


class Heartbeat(threading.Thread):
    """Publishes the node document and keeps the current job's StartedJobRegistry entry alive."""

    def __init__(self, worker, cfg: WorkerConfig):
        super().__init__(name="infra-heartbeat", daemon=True)
        self.worker = worker
        self.cfg = cfg
        self.stop_event = threading.Event()
        self.wake = threading.Event()
        self.key = f"{NODE_KEY_PREFIX}{socket.gethostname()}:{worker.name}"
        self._docker: dict | None = None
        self._docker_at = 0.0
        self.failures = 0

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.beat()
                if self.failures:
                    log.warning("heartbeat: Redis at %s reachable again", redact(self.cfg.redis_url))
                self.failures = 0
            except Exception as exc:  # connection loss: reported, retried with backoff
                self.failures += 1
                log.warning(
                    "heartbeat: Redis at %s unreachable (%s); retry %d", redact(self.cfg.redis_url), exc, self.failures
                )
            delay = self.cfg.heartbeat_interval if not self.failures else min(10.0, 0.5 * 2**self.failures)
            self.wake.wait(delay)
            self.wake.clear()

    def beat(self) -> None:
        from rq.registry import StartedJobRegistry

        from runner.node import docker_info, node_info
        from runner.run.records import now_iso

        conn = self.worker.connection
        ttl = self.cfg.heartbeat_ttl
        if self.cfg.backend == "docker" and time.monotonic() - self._docker_at > 300:
            self._docker, self._docker_at = docker_info(), time.monotonic()
        doc = node_info(self.cfg.workdir, docker=self._docker or {"reachable": None, "note": "local backend"})
        execution = self.worker.execution
        doc.update(
            worker=self.worker.name,
            pid=os.getpid(),
            queues=self.cfg.queues,
            gpu_slot=self.cfg.gpus,
            backend=self.cfg.backend,
            state=str(getattr(self.worker.get_state(), "value", self.worker.get_state())),
            current_job=execution.job_id if execution else None,
            heartbeat_at=now_iso(),
            ttl_s=ttl,
        )
        with conn.pipeline() as pipe:
            pipe.set(self.key, json.dumps(doc, default=str), ex=ttl)
            if execution is not None:
                registry = StartedJobRegistry(execution.job.origin, connection=conn, serializer=_serializer())
                execution.heartbeat(registry, ttl, pipe)
            pipe.execute()
        self.worker.heartbeat(timeout=ttl + 60)
        self.cleanup_abandoned(conn)

    def cleanup_abandoned(self, conn) -> None:
        """RQ's own abandoned-job handling, run by one worker at a time per queue."""
        from rq.registry import StartedJobRegistry

        for name in self.cfg.queues:
            if conn.set(
                CLEANUP_LOCK.format(name), self.worker.name, nx=True, px=int(self.cfg.heartbeat_interval * 1000)
            ):
                StartedJobRegistry(name, connection=conn, serializer=_serializer()).cleanup(
                    exception_handlers=[_retry_policy]
                )

    def stop(self) -> None:
        import redis.exceptions

        self.stop_event.set()
        self.wake.set()
        self.join(timeout=5)
        try:
            self.worker.connection.delete(self.key)
        except redis.exceptions.RedisError as exc:  # the heartbeat key expires by its TTL anyway
            log.debug("could not delete heartbeat %s: %s", self.key, exc)


def run_worker(cfg: WorkerConfig) -> bool:
    """Run one RQ worker until it is stopped (or, with `burst`, until the queues are empty).

    Returns whether it ran any job.
    """
    global _context, _current_worker

    if cfg.backend not in ("docker", "local"):
        raise UsageError(f"--backend {cfg.backend!r}: use 'docker' or 'local'")
    conn = connect(cfg.redis_url, retries=8)
    cfg.name = cfg.name or f"{socket.gethostname()}.{os.getpid()}"
    worker = _worker_class()(
        [_queue(conn, q) for q in cfg.queues],
        connection=conn,
        name=cfg.name,
        serializer=_serializer(),
        exception_handlers=[_retry_policy],
        worker_ttl=max(cfg.heartbeat_ttl, 20),
    )
    _context, _current_worker = cfg, worker
    beat = Heartbeat(worker, cfg)
    beat.start()
    log.info(
        "worker %s on %s, queues %s, backend %s, gpus %s",
        cfg.name,
        redact(cfg.redis_url),
        cfg.queues,
        cfg.backend,
        cfg.gpus,
    )
    try:
        return worker.work(burst=cfg.burst, logging_level=None, with_scheduler=False)
    finally:
        beat.stop()
        _context = _current_worker = None


def gpu_slots(gpus: str | None) -> list[str | None]:
    """One worker per GPU: "0,1" → ["0", "1"]; "all" → every NVML device (or one "all" slot)."""
    from runner.node import gpu_indices

    if gpus is None or gpus == "none":
        return [gpus]
    if gpus == "all":
        return gpu_indices() or ["all"]
    ids = [g.strip() for g in gpus.split(",")]
    if not all(g.isdigit() for g in ids) or len(set(ids)) != len(ids):
        raise UsageError(f"--gpus {gpus!r}: use device ids like '0,1', 'all' or 'none'")
    return ids


def run_pool(argv: list[str], slots: list[str], name: str) -> int:
    """Start one `infra worker` process per GPU slot and supervise them.

    Signals are forwarded to every child, so the two-stage stop applies to each worker.
    """
    children = []
    for slot in slots:
        cmd = [sys.executable, "-m", "runner", *argv, "--gpus", slot, "--name", f"{name}-gpu{slot}"]
        children.append(subprocess.Popen(cmd))

    def forward(signum, _frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [child.wait() for child in children]
    return max((abs(c) for c in codes), default=0)


# --- status ---------------------------------------------------------------------------------------


def queue_status(conn, names: list[str] | None = None) -> dict:
    """Counts per queue (queued, started, finished, failed, …), workers and node heartbeats."""
    from rq import Queue, Worker
    from rq.registry import (
        DeferredJobRegistry,
        FailedJobRegistry,
        FinishedJobRegistry,
        ScheduledJobRegistry,
        StartedJobRegistry,
    )

    ser = _serializer()
    queue_names = names or sorted(q.name for q in Queue.all(connection=conn, serializer=ser))
    queues = []
    for name in queue_names:
        q = _queue(conn, name)
        queues.append(
            {
                "name": name,
                "queued": q.count,
                # zcard, not count(): counting would run the abandoned-job cleanup from a status query
                "started": conn.zcard(StartedJobRegistry(name, connection=conn, serializer=ser).key),
                "finished": FinishedJobRegistry(name, connection=conn, serializer=ser).count,
                "failed": FailedJobRegistry(name, connection=conn, serializer=ser).count,
                "deferred": DeferredJobRegistry(name, connection=conn, serializer=ser).count,
                "scheduled": ScheduledJobRegistry(name, connection=conn, serializer=ser).count,
            }
        )
    nodes = {}
    for key in conn.scan_iter(match=f"{NODE_KEY_PREFIX}*", count=500):
        raw = conn.get(key)
        if raw:
            doc = json.loads(raw)
            doc["ttl_left_s"] = conn.ttl(key)
            nodes[doc.get("worker")] = doc
    workers = []
    for w in Worker.all(connection=conn, serializer=ser):
        node = nodes.pop(w.name, None)
        workers.append(_worker_doc(w, node))
    workers.extend(_worker_doc(None, node) for node in nodes.values())  # a heartbeat whose RQ record is gone
    return {"queues": queues, "workers": sorted(workers, key=lambda d: d["name"] or "")}


def _worker_doc(worker, node: dict | None) -> dict:
    doc = {
        "name": worker.name if worker else node.get("worker"),
        "state": str(getattr(worker.get_state(), "value", worker.get_state())) if worker else node.get("state"),
        "current_job": (worker.get_current_job_id() if worker else None) or (node or {}).get("current_job"),
        "queues": worker.queue_names() if worker else node.get("queues"),
        "last_heartbeat": (node or {}).get("heartbeat_at")
        or (worker.last_heartbeat.isoformat() if worker and worker.last_heartbeat else None),
        "alive": node is not None,
        "successful_jobs": worker.successful_job_count if worker else None,
        "failed_jobs": worker.failed_job_count if worker else None,
        "node": node,
    }
    return doc
