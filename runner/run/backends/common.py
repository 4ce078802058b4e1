"""What every backend does the same way around a training: finishing an attempt, hardening its outputs."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from runner import __version__, safefs
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
    """What follows a final record, for the one caller that made it final: harden, then track."""
    clear_setid_bits(exp)
    from runner.run.tracking import track_finished

    track_finished(exp, record)
    return record


def local_image_hash(workdir: Path) -> str:
    """The local backend's stand-in for an image hash: the plugin files and the core's version."""
    from runner.images import builds

    return builds.context_hash(builds.plugin_context_entries(workdir), {"backend": "local", "version": __version__})


def clear_setid_bits(exp: Experiment) -> None:
    """No file the training left may carry setuid/setgid bits (a way up for a local user)."""
    for sub in MOUNTED_DIRS:
        try:
            cleared = safefs.clear_setid_bits(exp.root / sub) if not (exp.root / sub).is_symlink() else []
        except FileNotFoundError:
            continue
        for rel in cleared:
            log.warning("%s: removed setuid/setgid bits from %s/%s left by the training", exp.id, sub, rel)
            exp.event("tampered", path=f"{sub}/{rel}", action="setuid/setgid bits removed")


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
