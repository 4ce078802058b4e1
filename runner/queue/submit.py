"""`infra submit`: a validated plan onto the queue once, under its experiment id.

- The submitter fixes the experiment id: the plan's `experiment_id`, else the id derived from the
  resolved plan, the database identity and the submitter's workdir plugins (`local_image_hash`, no
  Docker needed). It is written into the enqueued plan, so every worker uses exactly that id
  whatever its image hash. `data.db` is resolved to an absolute path by the submitter and must be
  valid on the workers (a shared filesystem), as must the workdir holding `experiments/`.
- The job is `execute_plan(plan)` with the plan's canonical JSON document (defaults filled in) as
  its only argument; the worker validates that document again before running it.
- A duplicate (same id queued, started, deferred or finished) is reported, not enqueued; a failed
  or stopped job of that id is replaced, and its experiment resumes from its checkpoint. Submitters
  serialise on a short Redis lock per id.
"""

from __future__ import annotations

import socket
import time
import uuid
from pathlib import Path

from runner.errors import EnvironmentProblem, PlanError, PlanIssue
from runner.queue.connection import DEFAULT_QUEUE, queue, serializer

SUBMIT_LOCK = "infra:submit-lock:{}"
RESULT_TTL_S = 30 * 86400  # a finished job (and so the duplicate check) is kept for 30 days
DEFAULT_RETRIES = 3
PENDING = ("queued", "started", "deferred", "scheduled", "created")


# A job is one experiment; `split.fold: "all"` is a study of one experiment per fold, which only
# `infra run` expands (docs/studies.md). Said by `infra submit` before anything is enqueued, and by the
# worker to a job some other client put on the queue, before anything exists.
FOLD_ALL_PROBLEM = (
    "'all' is a study (one experiment per fold) and a queue job is one experiment: put the study on the "
    "queue with 'infra run PLAN --submit' (a job per fold), or set one fold"
)


def study_issues(fold) -> list[PlanIssue]:
    """The issue of a plan whose `split.fold` makes it a study rather than one experiment."""
    return [PlanIssue("split.fold", FOLD_ALL_PROBLEM)] if fold == "all" else []


def submission_id(resolved: dict, workdir: Path | None) -> str:
    """The experiment id a submitted plan runs under (see the module docstring)."""
    from runner.run.backends.common import local_image_hash
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
    conn,
    resolved: dict,
    workdir: Path | None,
    queue_name: str = DEFAULT_QUEUE,
    retries: int = DEFAULT_RETRIES,
    source: str = "plan",
) -> dict:
    """Enqueue a validated, resolved plan once; a duplicate is reported instead. A study (`split.fold`
    "all") is a PlanError naming `source` (the plan's file): nothing is enqueued.

    Returns {"job_id", "experiment_id", "queue", "status", "duplicate", "replaced"}.
    """
    from rq import Retry
    from rq.exceptions import NoSuchJobError
    from rq.job import Job

    from runner.queue.job import JOB_FUNC  # the name RQ stores; the worker's guard allows only it
    from runner.run.records import now_iso

    issues = study_issues((resolved.get("split") or {}).get("fold"))
    if issues:
        raise PlanError(source, issues)
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
            job = Job.fetch(exp_id, connection=conn, serializer=serializer())
            status = job_status(job)
        except NoSuchJobError:
            job, status = None, None
        if job is not None and status in (*PENDING, "finished"):
            return _submitted(exp_id, job.origin, status, duplicate=True)
        if job is not None:  # failed, stopped or canceled: replace it; the experiment resumes
            job.delete()
            replaced = True
        job = queue(conn, queue_name).enqueue(
            JOB_FUNC,
            args=(plan,),
            job_id=exp_id,
            job_timeout=-1,  # training has no time limit
            result_ttl=RESULT_TTL_S,
            retry=Retry(max=retries) if retries > 0 else None,
            description=f"{plan['name']} ({exp_id})",
            meta={"submitted_by": socket.gethostname(), "submitted_at": now_iso(), "experiment_id": exp_id},
        )
        return _submitted(exp_id, queue_name, job_status(job), duplicate=False, replaced=replaced)
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


def job_status(job) -> str | None:
    status = job.get_status(refresh=True)
    return status.value if hasattr(status, "value") else status
