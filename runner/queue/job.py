"""The one job a worker runs, and the guard that makes it the only one.

Anyone who can write to Redis can put a job on the queue, so a job is untrusted input. RQ stores a
job as a function name plus arguments and, left alone, imports and calls whatever name it finds
(`os.system` included). `InfraJob` is the job class of every queue, registry and worker in an
`infra worker` process; before anything runs it checks the job (`refusal`):

- the function name is exactly JOB_FUNC (`runner.queue.job.execute_plan`); no bound instance;
- the arguments are exactly one JSON object (the plan) and no keyword arguments;
- the payload is at most MAX_PAYLOAD_BYTES (checked by the serializer before anything is parsed);
- no success/failure/stopped callbacks and no webhooks (infra sets none; RQ would import and call
  the callbacks by name, and send the webhooks' requests).

A refused job fails with `JobRefused` naming what was refused; nothing is imported or called. The
function name is never resolved by import: `InfraJob.func` returns `execute_plan` itself. The plan
is then validated like `infra validate` does (`load_plan_document`) before the run path sees it.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import TYPE_CHECKING

from rq.exceptions import DeserializationError
from rq.job import Job

from runner.errors import InfraError, Interrupted, UsageError
from runner.queue.connection import PayloadTooLarge

if TYPE_CHECKING:
    from runner.queue.worker import WorkerConfig

log = logging.getLogger(__name__)

JOB_FUNC = "runner.queue.job.execute_plan"
CALLBACKS = ("success", "failure", "stopped")


class JobRefused(InfraError):
    """A job that is not infra's own job function with one plan: failed, nothing run."""


def refusal(job: Job) -> str | None:
    """Why `job` must not run (one line), or None when it is infra's job function with one plan.

    Reads only data: the function name is compared as a string, nothing is imported.
    """
    name = job.func_name
    if name != JOB_FUNC:
        return f"function {_show(name)} is not infra's job function {JOB_FUNC}; nothing was run"
    if job.instance is not None:
        return f"the job binds {JOB_FUNC} to an instance ({_show(job.instance)}); nothing was run"
    kwargs, args = job.kwargs, job.args
    if not isinstance(kwargs, dict) or kwargs:
        keys = sorted(kwargs) if isinstance(kwargs, dict) else kwargs
        return f"{JOB_FUNC} takes no keyword arguments, the job has {_show(keys)}; nothing was run"
    if not isinstance(args, list | tuple) or len(args) != 1 or not isinstance(args[0], dict):
        return f"{JOB_FUNC} takes exactly one argument, a plan object; the job has {_show(args)}; nothing was run"
    for kind in CALLBACKS:
        callback = getattr(job, f"_{kind}_callback_name", None)
        if isinstance(callback, str) and callback:
            return f"the job asks for a {kind} callback {_show(callback)}; infra jobs have none; nothing was run"
    if job.webhooks:
        return f"the job asks for {len(job.webhooks)} webhook(s); infra jobs have none; nothing was run"
    return None


def refuse(job_id: str | None, problem: str | None, kind: type[JobRefused] = JobRefused) -> JobRefused:
    """The error that fails a refused job, logged by the worker as it is raised."""
    job_id = _plain(str(job_id))
    log.error("refused job %s: %s", job_id, problem)
    return kind(f"job {job_id} refused: {problem}")


def _show(value, limit: int = 80) -> str:
    """A short printable rendering (repr) of an untrusted value for a one-line message."""
    return _plain(repr(value), limit)


def _plain(text: str, limit: int = 120) -> str:
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class PayloadRefused(JobRefused, DeserializationError):
    """A job whose stored payload is not readable JSON (or is over the size limit): failed unread."""


class InfraJob(Job):
    """An RQ job that can only ever run `execute_plan` with one plan, and never resolves names."""

    _unreadable: PayloadRefused | None = None

    def _deserialize_data(self):
        # RQ decodes the payload here, lazily, the first time the function name or arguments are
        # read (before `perform`); an unreadable one fails the job with this message instead of
        # RQ's bare DeserializationError (a subclass of it, which RQ's failure handling expects).
        if self._unreadable is None:
            try:
                return super()._deserialize_data()
            except DeserializationError as exc:
                cause = exc.__cause__
                if isinstance(cause, PayloadTooLarge):
                    problem = str(cause)
                else:  # not UTF-8, not JSON, or JSON that is not [function, instance, args, kwargs]
                    problem = f"payload is not a JSON job ({_plain(f'{type(cause).__name__}: {cause}')})"
                self._unreadable = refuse(self.id, f"its {problem}; nothing was run", PayloadRefused)
        raise self._unreadable

    def perform(self):
        problem = refusal(self)
        if problem:
            raise refuse(self.id, problem)
        return super().perform()

    @property
    def func(self):
        # RQ resolves the function here (by import): only infra's own, and never by import.
        if self.func_name != JOB_FUNC or self.instance is not None:
            raise refuse(self.id, refusal(self))
        return execute_plan

    # RQ would import and call callbacks by the names stored in the job; infra sets none, `refusal`
    # fails a job that asks for one, and these keep RQ's own failure path from resolving them.
    @property
    def success_callback(self):
        return None

    @property
    def failure_callback(self):
        return None

    @property
    def stopped_callback(self):
        return None

    def send_webhooks(self, status, *, exc_string=None) -> None:
        if self.webhooks:
            log.warning("job %s: %d webhook(s) not sent: infra jobs have none", self.id, len(self.webhooks))


# --- the job function -----------------------------------------------------------------------------

_context: WorkerConfig | None = None  # set by run_worker: the job function runs in the worker process


def bind(cfg: WorkerConfig | None) -> None:
    """Give `execute_plan` the worker's configuration (None when the worker ends)."""
    global _context
    _context = cfg


# What a refused job says about its database, to whoever can read Redis: not whether a host path
# exists, is a file or is SQLite (the details go to the worker's log only).
HIDDEN_DB_PROBLEM = "not a mutation database this worker can use (the reason is in the worker's log)"


def _load_queued_plan(plan: dict, job_id: str | None, workdir):
    """The job's plan, validated like `infra validate`; a problem with `data.db` is reported without
    the detail that would let a queue client probe the worker's filesystem."""
    from runner.errors import PlanError, PlanIssue
    from runner.plan.load import load_plan_document
    from runner.queue.submit import study_issues

    try:
        loaded = load_plan_document(plan, f"job {job_id}", workdir)
    except PlanError as exc:
        hidden = [i for i in exc.issues if i.path == "data.db"]
        if not hidden:
            raise
        for issue in hidden:
            log.error("job %s: data.db: %s", job_id, issue.message)
        issues = [PlanIssue(i.path, HIDDEN_DB_PROBLEM) if i.path == "data.db" else i for i in exc.issues]
        raise PlanError(exc.source, issues) from None
    issues = study_issues(loaded.plan.split.fold)  # a study put on the queue by another client
    if issues:
        raise PlanError(f"job {job_id}", issues)
    return loaded


def execute_plan(plan: dict) -> dict:
    """RQ job function: validate the submitted plan and run it through `runner.run.launch.run`.

    The plan is validated like `infra validate` (schema, semantic and database checks); its
    `experiment_id` must be the job id. Returns the experiment's final state and metrics summary
    (the job's result). A failed training raises (a failed job); a stop raises Interrupted.
    """
    from rq import get_current_job

    from runner.run.launch import RunOptions, run
    from runner.run.records import metrics_summary, outcome_summary

    cfg = _context
    if cfg is None:
        raise UsageError("execute_plan runs inside 'infra worker' only")
    job = get_current_job()
    job_id = job.id if job is not None else None
    started = time.monotonic()
    loaded = _load_queued_plan(plan, job_id, cfg.workdir)
    exp_id = loaded.plan.experiment_id
    if exp_id != job_id:
        problem = f"its plan's experiment_id {_show(exp_id)} is not the job id; submit with 'infra submit'"
        raise refuse(job_id, f"{problem}; nothing was run")

    def on_event(event: dict) -> None:
        if event.get("event") in ("state", "reused", "attached"):
            log.info("job %s: %s %s", exp_id, event.get("event"), event.get("state"))

    opts = RunOptions(
        backend=cfg.backend,
        gpus=cfg.gpus,
        detach=False,
        stop_timeout=cfg.stop_timeout,
        on_log=lambda line: log.debug("%s | %s", exp_id, line),
        on_event=on_event,
    )
    run_started = time.monotonic()
    try:
        outcome = cfg.warm.run(loaded, cfg.workdir, opts) if cfg.warm is not None else run(loaded, cfg.workdir, opts)
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
        **metrics_summary(outcome.exp_dir),
        **outcome_summary(outcome.exp_dir),
    }
