"""What every backend does the same way around a training: finishing an attempt, hardening its outputs."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from runner import __version__, safefs
from runner.run.jobs import EMBED_CACHE
from runner.run.records import ACTIVE, MOUNTED_DIRS, Experiment

log = logging.getLogger(__name__)

FINAL_LOCK_TIMEOUT_S = 600


def final_lock(exp: Experiment):
    """Serialises finalisation per experiment: the runner and any number of readers may see the same end."""
    from filelock import FileLock

    return FileLock(str(exp.lock_path.with_name(f"{exp.id}.final.lock")), timeout=FINAL_LOCK_TIMEOUT_S)


def still_this_attempt(current: dict, record: dict) -> bool:
    """Whether the record on disk is still the active attempt `record` describes (nobody finalised it)."""
    return current.get("state") in ACTIVE and current.get("attempt") == record.get("attempt")


def after_final(exp: Experiment, record: dict) -> dict:
    """What follows a final record, for the one caller that made it final: tracking.

    The outputs were hardened before the record turned final (`harden_outputs`, from `finalize`).
    """
    from runner.run.tracking import track_finished

    track_finished(exp, record)
    return record


def local_image_hash(workdir: Path) -> str:
    """The local backend's stand-in for an image hash: the plugin files and the core's version."""
    from runner.images import builds

    return builds.context_hash(builds.plugin_context_entries(workdir), {"backend": "local", "version": __version__})


def harden_outputs(exp: Experiment) -> str | None:
    """Clear setuid/setgid bits on every file the training left; None, or why the attempt must fail.

    Called before the record says how the attempt ended, so no record says `succeeded` over a tree
    that still holds such a file (a way up for a local user). The walk is bounded
    (`safefs.WALK_MAX_*`, one budget for all output folders); a folder it could not fully check is
    closed to everyone but its owner (u only) and the reason is returned, one line naming the path
    and the limit, for the record's message.
    """
    budget = safefs.WalkBudget()
    problems = []
    # the experiment's output folders, and the workdir's embedding cache, which plm trainings write too
    folders = [(exp.root, sub) for sub in MOUNTED_DIRS] + [(exp.root.parent.parent, EMBED_CACHE)]
    for base, sub in folders:
        try:
            checked = safefs.clear_setid_bits(base / sub, budget)
        except FileNotFoundError:
            continue
        except (safefs.Tampered, OSError) as exc:
            problems.append(getattr(exc, "message", None) or f"{base / sub}: cannot be checked ({exc})")
            continue
        for rel in checked.cleared:
            shown = safefs.shown_path(f"{sub}/{rel}")
            log.warning("%s: removed setuid/setgid bits from %s left by the training", exp.id, shown)
            exp.event("tampered", path=shown, action="setuid/setgid bits removed")
        if checked.unchecked is not None:
            problems.append(checked.unchecked)
            _close(exp, base, sub)
    if not problems:
        return None
    exp.event("tampered", action="output not fully checked for setuid/setgid files", reason=problems[0])
    return (
        f"{problems[0]}; the training's output could not be fully checked for setuid/setgid files, so the "
        f"attempt is failed (the folder is closed to other users); remove it with 'infra rm {exp.id}'"
    )


def _close(exp: Experiment, base: Path, sub: str) -> None:
    """Leave a folder that was not fully checked open to its owner only (whatever it holds)."""
    try:
        with safefs.open_dir(base, sub) as fd:
            os.fchmod(fd, 0o700)
    except (OSError, safefs.Tampered) as exc:  # already reported as not checked; the record fails anyway
        log.warning("%s: could not close %s/%s: %s", exp.id, base, sub, exc)


def stop_with_second_interrupt(stop: Callable[[], None]) -> None:
    """Run a graceful stop; a second Ctrl-C during it is swallowed so the stop (and the record) completes."""
    done = threading.Event()

    def target():
        try:
            stop()
        finally:
            done.set()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    while not done.is_set():
        try:
            done.wait(0.2)
        except KeyboardInterrupt:
            log.warning("stopping: waiting for the training to checkpoint (it is killed after the stop timeout)")
