"""The workdirs this user has run experiments in, for housekeeping that is node-wide.

Images live in the node's Docker engine, experiments in workdirs: `infra prune --images` run in one
workdir must keep the images that another workdir's experiments ran on (their records pin the image
id; `infra predict` on them needs it). Every run and study remembers its workdir here
(`workdirs.json` in the user's config dir, beside `config.json`); pruning reads the records of all
of them. The list is the invoker's own (one node user's runs): the file is written by infra only,
atomically, under a lock, and read with a size cap.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from filelock import FileLock, Timeout

from runner import safefs
from runner.settings import config_dir

log = logging.getLogger(__name__)

KNOWN_FILE = "workdirs.json"
KNOWN_LIMIT = 4 << 20  # a few thousand paths; more is not a list infra wrote
LOCK_TIMEOUT_S = 30


def _path() -> Path:
    return config_dir() / KNOWN_FILE


def known_workdirs() -> list[Path]:
    """The remembered workdirs, oldest first (an unreadable or damaged list reads as empty: it is
    rewritten by the next run, and pruning then keeps only what the current workdir knows)."""
    path = _path()
    try:
        doc = json.loads(safefs.read_bytes(path.parent, path.name, limit=KNOWN_LIMIT))
    except (OSError, ValueError, safefs.Tampered, safefs.TooLarge):
        return []
    if not isinstance(doc, list):
        return []
    return [Path(p) for p in doc if isinstance(p, str) and os.path.isabs(p)]


def remember(workdir: Path) -> None:
    """Add `workdir` (resolved) to the list, once. A list that cannot be written is a warning, not a
    failed run: what it costs is said (another workdir's prune may not see this one's images)."""
    path = _path()
    entry = str(Path(workdir).resolve())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S):
            known = [str(p) for p in known_workdirs()]
            if entry in known:
                return
            safefs.write_atomic(path.parent, path.name, (json.dumps([*known, entry], indent=1) + "\n").encode())
    except (OSError, Timeout, safefs.Tampered) as exc:
        log.warning(
            "could not add %s to %s (%s): 'infra prune --images' in another workdir will not know the images "
            "its experiments ran on",
            entry,
            path,
            exc,
        )
