"""Reading experiments truthfully: reconcile each record with the engine (or the local process).

A record that says `starting`/`running` is checked against the container found by the
`infra.experiment_id` label (docker backend) or the process id (local backend) every time it is
read. A container that exited is finalised (its log saved by `runner.run.logs`, the exit code and
final state recorded, the container removed); one that vanished makes the record `lost`. So a killed
runner or a dropped SSH session never leaves a run looking alive.
"""

from __future__ import annotations

import logging
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

from runner.errors import EnvironmentProblem
from runner.run.logs import follow_file  # noqa: F401 - launch.py's import until it calls runner.run.logs
from runner.run.records import ACTIVE, Experiment, now_iso

log = logging.getLogger(__name__)

LABEL_EXPERIMENT = "infra.experiment_id"
LABEL_ATTEMPT = "infra.attempt"
LABEL_PLAN = "infra.plan_sha256"
LABEL_VERSION = "infra.version"
EXIT_FILE = ".exit_code"  # written by the local backend's wrapper when the core process ends
CANCEL_EXIT_CODES = (130, 143)  # the core exits 143 after a graceful SIGTERM stop


def final_state(exit_code: int | None, stop_requested: bool) -> str:
    if exit_code == 0:
        return "succeeded"
    if stop_requested or exit_code in CANCEL_EXIT_CODES:
        return "cancelled"
    return "failed"


class EngineHandle:
    """A Docker client made on first use, so reading local-backend records never needs Docker."""

    def __init__(self, client=None):
        self._client = client
        self.error: EnvironmentProblem | None = None

    def get(self):
        if self._client is None and self.error is None:
            from runner import engine

            try:
                self._client = engine.get_client()
            except EnvironmentProblem as exc:
                self.error = exc
        return self._client


def container_for(client, record: dict):
    from runner import engine

    found = engine.find_containers(
        client, {LABEL_EXPERIMENT: record["experiment_id"], LABEL_ATTEMPT: str(record.get("attempt"))}
    )
    return found[0] if found else None


def finalize(exp: Experiment, record: dict, exit_code: int | None, container=None, message: str | None = None) -> dict:
    """Record the final state of an attempt; save the log and remove the container when given one."""
    state = final_state(exit_code, bool(record.get("stop_requested")))
    if container is not None and not record.get("log_complete"):
        try:
            from runner.run.logs import save_container_log

            save_container_log(exp, container)
        except Exception as exc:  # the record must still be finalised; say why the log is partial
            log.warning("could not save the log of %s: %s", exp.id, exc)
    if message is None and state == "failed":
        message = f"training exited with code {exit_code}; see {exp.container_log}"
    # Record first, remove second: a concurrent reader then sees either the final record or a
    # container that still exists, never an active record without its container (which reads as lost).
    record = exp.update(state=state, exit_code=exit_code, finished_at=now_iso(), log_complete=True, message=message)
    if container is not None:
        from runner import engine

        engine.remove_container(container)
    return record


def reconcile(exp: Experiment, engine_handle: EngineHandle | None = None) -> dict:
    """The record, made true: active records are checked against the engine or the process."""
    record = exp.read()
    if record.get("state") not in ACTIVE:
        return record
    if record.get("backend") == "local":
        return _reconcile_local(exp, record)
    if record.get("state") != "running" and not record.get("container_id"):
        # building/starting in a live runner: trust it while that runner is alive
        if _pid_alive(record.get("runner_pid")):
            return record
        return exp.update(
            state="lost", finished_at=now_iso(), message="the runner stopped before the container started"
        )
    handle = engine_handle or EngineHandle()
    client = handle.get()
    if client is None:
        record["verified"] = False
        record["message"] = f"state not verified: {handle.error}"
        return record
    from runner import engine

    container = container_for(client, record)
    if container is None:
        return exp.update(
            state="lost",
            finished_at=now_iso(),
            message="the container is gone from the engine (removed or the engine was reset)",
        )
    state = engine.container_state(container)
    if state["status"] == "removed":  # finalised by another reader just now
        record = exp.read()
        if record.get("state") in ACTIVE:
            return exp.update(state="lost", finished_at=now_iso(), message="the container was removed while running")
        return record
    if state["status"] in ("created", "running", "restarting", "paused"):
        if record.get("state") != "running":
            record = exp.update(state="running")
        return record
    return finalize(exp, record, state["exit_code"], container)


def _reconcile_local(exp: Experiment, record: dict) -> dict:
    pid = record.get("pid")
    if _pid_alive(pid) and _is_our_process(pid, exp.id):
        return record
    exit_file = exp.root / EXIT_FILE
    try:
        code = int(exit_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return exp.update(
            state="lost", finished_at=now_iso(), message="the training process is gone and left no exit code"
        )
    return finalize(exp, record, code)


def _pid_alive(pid) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as gone
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _is_our_process(pid, experiment_id: str) -> bool:
    """Guard against pid reuse: the process's command line names the experiment directory."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return True
    return experiment_id in cmdline


_AGE_RE = re.compile(r"([0-9]+)([smhd])")
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(value: str) -> datetime:
    """'30m', '12h', '7d' (ago) or an ISO 8601 time; a UsageError says which forms work.

    An age reaching before year 1 is a UsageError too (not an OverflowError traceback).
    """
    from runner.errors import UsageError

    shown = repr(value if len(value) <= 40 else value[:40] + "…")
    age = _AGE_RE.fullmatch(value)
    if age:
        try:
            return datetime.now(UTC) - timedelta(seconds=int(age.group(1)) * _AGE_UNITS[age.group(2)])
        except (OverflowError, ValueError):  # ValueError: more digits than Python converts
            raise UsageError(f"--since {shown}: reaches back before year 1; use a smaller age or an ISO time") from None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--since {shown}: use an ISO time (2026-11-27T10:00) or an age like 30m, 12h, 7d") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def list_experiments(workdir: Path, states: list[str] | None = None, since: str | None = None) -> list[dict]:
    """Reconciled records of the workdir's experiments, newest first; one engine client for all."""
    from runner.errors import UsageError
    from runner.run.records import STATES, all_experiments

    for s in states or []:
        if s not in STATES:
            raise UsageError(f"--state {s!r}: use one of {', '.join(STATES)}")
    cutoff = parse_since(since) if since else None
    handle = EngineHandle()
    rows = []
    for exp in all_experiments(workdir):
        record = reconcile(exp, handle)
        if states and record.get("state") not in states:
            continue
        if cutoff and datetime.fromisoformat(record["created_at"].replace("Z", "+00:00")) < cutoff:
            continue
        rows.append(record)
    return sorted(rows, key=lambda r: r.get("created_at") or "", reverse=True)
