"""`infra worker`: an RQ worker that runs only infra's job, with heartbeats and a two-stage stop.

- RQ's `SimpleWorker`: the job runs in the worker process (the training itself is a container or
  a separate process anyway), so `SIGKILL` of the worker really kills the job's runner. Every
  queue, registry and job object of the worker uses `InfraJob` (runner.queue.job), which refuses
  anything but infra's job function with one plan.
- Heartbeats: a thread writes `infra:node:<host>:<worker>` (the node's resources, TTL =
  `heartbeat_ttl`) and keeps the running job's entry in RQ's StartedJobRegistry alive for the same
  TTL. A dead worker's entry expires; the next cleanup (any live worker runs RQ's own
  `StartedJobRegistry.cleanup` each beat, one at a time via a Redis lock) retries the abandoned
  job, which resumes from `ckpts/last.ckpt` on whichever worker takes it.
- Signals: the first SIGTERM/SIGINT is RQ's warm shutdown (finish the current job, take no more);
  the second stops the training gracefully (the run path's Ctrl-C handling: checkpoint,
  `cancelled`), puts the job back at the front of its queue and exits.
- Retries are spent only on abandoned jobs; a training that fails is a failed job (not retried).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rq import SimpleWorker

from runner.errors import Interrupted
from runner.plan.models import GpuRequest
from runner.queue import job as infra_job
from runner.queue.connection import DEFAULT_QUEUE, NODE_KEY_PREFIX, connect, queue, redact, serializer

log = logging.getLogger(__name__)

CLEANUP_LOCK = "infra:cleanup-lock:{}"
DEFAULT_HEARTBEAT_TTL = 60


if TYPE_CHECKING:
    from runner.run.backends import Backend
    from runner.run.lanes import WarmLane


@dataclass
class WorkerConfig:
    """How one worker process runs its jobs (flag → default, resolved once by the CLI)."""

    redis_url: str
    workdir: Path
    backend: Backend
    queues: list[str] = field(default_factory=lambda: [DEFAULT_QUEUE])
    gpus: GpuRequest | None = None  # this worker's GPU slot (devices, all, none), or None: each plan's own
    burst: bool = False
    name: str | None = None
    heartbeat_ttl: int = DEFAULT_HEARTBEAT_TTL
    stop_timeout: int = 60
    isolated: bool = False  # a fresh training process per job instead of a warm slot
    warm: WarmLane | None = None  # set by run_worker: the slot kept between jobs

    @property
    def heartbeat_interval(self) -> float:
        return max(0.5, self.heartbeat_ttl / 3)


class InfraWorker(SimpleWorker):
    """RQ's in-process worker with infra's guarded job class and a graceful two-stage stop."""

    job_class = infra_job.InfraJob
    force_stopping = False
    # How long the thread that listens for RQ's commands (shutdown, stop-job) may block in one read.
    # RQ uses 60 s (rq/rq#2228); since redis-py 6 `PubSubWorkerThread.stop()` joins that thread without
    # a timeout, and when the thread saw the unsubscribe first it sleeps the whole 60 s on "no channel
    # yet": about one `infra worker --burst` in ten took a minute to exit. One wake-up a second is free.
    pubsub_sleep_s = 1.0

    def subscribe(self):
        self.log.info("Worker %s: subscribing to channel %s", self.name, self.pubsub_channel_name)
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(
            sleep_time=self.pubsub_sleep_s, daemon=True, exception_handler=self._pubsub_exception_handler
        )

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

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        # RQ reads the dequeued job's record here; a record it cannot parse (a bad date or timeout
        # written by someone else) would end the worker. It fails that job instead and goes on.
        while True:
            try:
                return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
            except Exception as exc:
                job_id, origin = getattr(exc, "job_id", None), getattr(exc, "queue", None)
                if job_id is None or origin is None:  # not about one job's record (RQ tags those)
                    raise
                self.fail_unreadable(job_id, origin, exc)

    def fail_unreadable(self, job_id: str, origin, exc: Exception) -> None:
        """Mark a job whose record cannot be read as failed, with the reason, without running it."""
        from rq.defaults import DEFAULT_FAILURE_TTL
        from rq.registry import FailedJobRegistry

        problem = infra_job.refuse(job_id, f"its record cannot be read ({type(exc).__name__}: {exc}); nothing was run")
        with self.connection.pipeline() as pipe:
            pipe.lrem(origin.intermediate_queue_key, 1, job_id)
            pipe.hset(self.job_class.key_for(job_id), mapping={"status": "failed", "exc_info": str(problem)})
            registry = FailedJobRegistry(origin.name, connection=self.connection, serializer=serializer())
            pipe.zadd(registry.key, {job_id: time.time() + DEFAULT_FAILURE_TTL})
            pipe.execute()


_current_worker: InfraWorker | None = None


def retry_policy(job, exc_type, exc_value, traceback) -> bool:
    """Exception handler: spend retries on abandoned jobs only; requeue a job stopped by shutdown."""
    from rq.exceptions import AbandonedJobError

    worker = _current_worker
    if exc_type is AbandonedJobError:
        return True
    if worker is not None and worker.force_stopping and issubclass(exc_type, Interrupted | KeyboardInterrupt):
        job.retries_left = (job.retries_left or 0) + 1  # requeue without spending a retry
        return True
    job.retries_left = 0  # a failed training, a refused job or a bad plan is not retried
    return True


class Heartbeat(threading.Thread):
    """Publishes the node document and keeps the current job's StartedJobRegistry entry alive."""

    def __init__(self, worker: InfraWorker, cfg: WorkerConfig):
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

        from runner.node import node_info
        from runner.run.records import now_iso

        conn = self.worker.connection
        ttl = self.cfg.heartbeat_ttl
        if self._docker is None or time.monotonic() - self._docker_at > 300:
            self._docker, self._docker_at = self.cfg.backend.engine_info(), time.monotonic()
        doc = node_info(self.cfg.workdir, docker=self._docker, cache_bytes=False)
        execution = self.worker.execution
        doc.update(
            worker=self.worker.name,
            pid=os.getpid(),
            queues=self.cfg.queues,
            gpu_slot=self.cfg.gpus.text() if self.cfg.gpus else None,
            backend=self.cfg.backend.name,
            state=str(getattr(self.worker.get_state(), "value", self.worker.get_state())),
            current_job=execution.job_id if execution else None,
            heartbeat_at=now_iso(),
            ttl_s=ttl,
        )
        with conn.pipeline() as pipe:
            pipe.set(self.key, json.dumps(doc, default=str), ex=ttl)
            if execution is not None:
                registry = StartedJobRegistry(
                    execution.job.origin, connection=conn, serializer=serializer(), job_class=infra_job.InfraJob
                )
                execution.heartbeat(registry, ttl, pipe)
            pipe.execute()
        # RQ's own worker hash only once RQ registered the worker's birth: a heartbeat before that
        # creates the hash, and register_birth then refuses the name as "an active worker already".
        if self.worker.birth_date is not None:
            self.worker.heartbeat(timeout=ttl + 60)
        self.cleanup_abandoned(conn)

    def cleanup_abandoned(self, conn) -> None:
        """RQ's own abandoned-job handling, run by one worker at a time per queue."""
        from rq.registry import StartedJobRegistry

        for name in self.cfg.queues:
            if conn.set(
                CLEANUP_LOCK.format(name), self.worker.name, nx=True, px=int(self.cfg.heartbeat_interval * 1000)
            ):
                registry = StartedJobRegistry(
                    name, connection=conn, serializer=serializer(), job_class=infra_job.InfraJob
                )
                registry.cleanup(exception_handlers=[retry_policy])

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
    global _current_worker

    conn = connect(cfg.redis_url, retries=8)
    cfg.name = cfg.name or f"{socket.gethostname()}.{os.getpid()}"
    worker = InfraWorker(
        [queue(conn, q, job_class=infra_job.InfraJob) for q in cfg.queues],
        connection=conn,
        name=cfg.name,
        serializer=serializer(),
        job_class=infra_job.InfraJob,
        exception_handlers=[retry_policy],
        worker_ttl=max(cfg.heartbeat_ttl, 20),
    )
    if not cfg.isolated:
        from runner.run.lanes import WarmLane

        cfg.warm = WarmLane(f"worker-{re.sub(r'[^a-z0-9._-]', '-', cfg.name.lower())[:40]}")
    infra_job.bind(cfg)
    _current_worker = worker
    beat = Heartbeat(worker, cfg)
    beat.start()
    log.info(
        "worker %s on %s, queues %s, backend %s, gpus %s",
        cfg.name,
        redact(cfg.redis_url),
        cfg.queues,
        cfg.backend.name,
        cfg.gpus.text() if cfg.gpus else "each plan's",
    )
    try:
        return worker.work(burst=cfg.burst, logging_level=None, with_scheduler=False)
    finally:
        beat.stop()
        if cfg.warm is not None:
            cfg.warm.close()
        infra_job.bind(None)
        _current_worker = None
