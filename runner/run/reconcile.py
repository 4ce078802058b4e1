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

from runner.run.records import ACTIVE, Experiment, now_iso

log = logging.getLogger(__name__)

CANCEL_EXIT_CODES = (130, 143)  # the core exits 143 after a graceful SIGTERM stop


def final_state(exit_code: int | None, stop_requested: bool) -> str:
    if exit_code == 0:
        return "succeeded"
    if stop_requested or exit_code in CANCEL_EXIT_CODES:
        return "cancelled"
    return "failed"


def finalize(exp: Experiment, record: dict, exit_code: int | None, message: str | None = None) -> dict:
    """Harden the attempt's outputs, then record its final state (the backend saves the log and
    removes its container). Output that could not be fully checked makes the attempt `failed`."""
    from runner.run.backends.common import harden_outputs

    unchecked = harden_outputs(exp)  # before the record says how it ended: fail closed (docs/security.md)
    state = final_state(exit_code, bool(record.get("stop_requested")))
    if unchecked is not None:
        state, message = "failed", unchecked
    elif message is None and state == "failed":
        message = f"training exited with code {exit_code}; see {exp.container_log}"
    return exp.update(state=state, exit_code=exit_code, finished_at=now_iso(), log_complete=True, message=message)


def reconcile(exp: Experiment, backend=None) -> dict:
    """The record, made true: an active record is checked against its backend (engine or process).

    `backend` is reused when it is the record's kind (one engine client for many records).
    """
    record = exp.read()
    if record.get("state") not in ACTIVE:
        return record
    if backend is None or backend.name != record.get("backend"):
        from runner.run.backends import backend_of

        backend = backend_of(record)
    return backend.reconcile(exp, record)


def pid_alive(pid) -> bool:
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


def is_our_process(pid, experiment_id: str) -> bool:
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


def list_experiments(
    workdir: Path, states: list[str] | None = None, since: str | None = None, only: set[str] | None = None
) -> list[dict]:
    """Reconciled records of the workdir's experiments (`only` these ids, when given: nothing else is
    read or reconciled), newest first; one engine client for all.

    A record that cannot be read is listed with state "unreadable" and the reason, never skipped
    silently and never a reason for the whole listing to fail.
    """
    from runner.errors import UsageError
    from runner.run.backends import backend_of
    from runner.run.records import STATES, RecordError, all_experiments

    for s in states or []:
        if s not in (*STATES, "unreadable"):
            raise UsageError(f"--state {s!r}: use one of {', '.join(STATES)}, unreadable")
    cutoff = parse_since(since) if since else None
    backends: dict = {}
    rows = []
    for exp in all_experiments(workdir):
        if only is not None and exp.id not in only:
            continue
        try:
            record = exp.read()
            if record.get("state") in ACTIVE:
                record = reconcile(exp, backend_of(record, backends))
        except RecordError as exc:
            record = {"experiment_id": exp.id, "state": "unreadable", "message": exc.message, "exp_dir": str(exp.root)}
        if states and record.get("state") not in states:
            continue
        if cutoff and _created(record) < cutoff:
            continue
        rows.append(record)
    return sorted(rows, key=lambda r: str(r.get("created_at") or ""), reverse=True)


def _created(record: dict) -> datetime:
    try:
        return datetime.fromisoformat(str(record.get("created_at")).replace("Z", "+00:00"))
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)
