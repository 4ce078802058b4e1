"""The workdirs this user has run experiments in, for housekeeping that is node-wide.

Images live in the node's Docker engine, experiments in workdirs: `infra prune --images` run in one
workdir must keep the images that another workdir's experiments ran on (their records pin the image
id; `infra predict` on them needs it). Every run and study remembers its workdir here
(`workdirs.json` in the user's config dir, beside `config.json`); pruning reads the records of all
of them, and refuses to prune images when the list is damaged (it cannot know what it would break).
Workdirs last run before infra kept this list are not in it until their next run. The list is the invoker's own (one node user's runs): the file is written by infra only,
atomically, under a lock, and read with a size cap.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from filelock import FileLock, Timeout

from runner import safefs
from runner.errors import InfraError
from runner.settings import config_dir

log = logging.getLogger(__name__)

KNOWN_FILE = "workdirs.json"
KNOWN_LIMIT = 4 << 20  # a few thousand paths; more is not a list infra wrote
LOCK_TIMEOUT_S = 30


def _path() -> Path:
    return config_dir() / KNOWN_FILE


class KnownListDamaged(InfraError):
    """The list exists but cannot be read as infra wrote it (exit 1): image pruning stops rather than
    protect less than it should."""

    exit_code = 1


def known_workdirs() -> list[Path]:
    """The remembered workdirs, oldest first ([] when no run remembered one yet); KnownListDamaged
    when the file is there but unreadable, too large, not a regular file or not a list of paths."""
    path = _path()
    try:
        doc = json.loads(safefs.read_bytes(path.parent, path.name, limit=KNOWN_LIMIT))
    except FileNotFoundError:
        return []
    except (OSError, ValueError, safefs.Tampered, safefs.TooLarge) as exc:
        raise _damaged(path, getattr(exc, "message", None) or str(exc)) from None
    if not isinstance(doc, list) or not all(isinstance(p, str) and os.path.isabs(p) for p in doc):
        raise _damaged(path, "not a list of absolute paths")
    return [Path(p) for p in doc]


def _damaged(path: Path, why: str) -> KnownListDamaged:
    return KnownListDamaged(
        f"{path}: the list of workdirs this user ran experiments in is damaged ({why}); fix it, or delete it "
        "(then 'infra prune --images' protects only the images of the workdirs run from now on)"
    )


def remember(workdir: Path) -> None:
    """Add `workdir` (resolved) to the list, once. A list that cannot be read or written is a warning,
    not a failed run: what it costs is said; a damaged list is left as it is (rewriting it would
    forget the other workdirs)."""
    path = _path()
    entry = str(Path(workdir).resolve())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S):
            known = [str(p) for p in known_workdirs()]
            if entry in known:
                return
            safefs.write_atomic(path.parent, path.name, (json.dumps([*known, entry], indent=1) + "\n").encode())
    except (OSError, Timeout, safefs.Tampered, KnownListDamaged) as exc:
        log.warning(
            "could not add %s to %s (%s): 'infra prune --images' in another workdir will not know the images "
            "its experiments ran on",
            entry,
            path,
            getattr(exc, "message", None) or exc,
        )
