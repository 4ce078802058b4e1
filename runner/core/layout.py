"""The experiment directory as the training sees it (DESIGN §6): atomic files, append-only JSON lines.

Every file is written atomically (`runner.safefs`: temp + rename, no links followed);
`logs/events.jsonl` only ever receives whole lines in one `write` call. The host's records
(status.json, events.jsonl, container.log at the top of the experiment) are not visible here.
"""

from __future__ import annotations

import json
import os
import platform
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from runner import safefs

# The training's own events (progress, epochs); the host's state events are in <exp>/events.jsonl,
# which the container cannot see.
EVENTS_FILE = "logs/events.jsonl"
LAYOUT_DIRS = ("config", "data", "splits", "logs", "metrics", "ckpts", "artifacts/visualization")
CORE_VERSION = "0.1.0"


def core_version() -> str:
    try:
        from importlib.metadata import version

        return version("infra")
    except Exception:  # running from a source tree
        return CORE_VERSION


class Layout:
    """The experiment directory: atomic file writes and append-only JSON lines."""

    def __init__(self, root: str | Path, experiment_id: str | None = None):
        self.root = Path(root)
        for sub in LAYOUT_DIRS:
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # named by the caller (infra-train passes its INFRA_EXPERIMENT_ID), else by the folder
        self.experiment_id = experiment_id or self.root.name

    def path(self, rel: str | Path) -> Path:
        return self.root / rel

    def write_bytes(self, rel: str | Path, data: bytes) -> Path:
        rel = Path(rel)
        rel = rel.relative_to(self.root) if rel.is_absolute() else rel
        safefs.write_atomic(self.root, rel, data)
        return self.path(rel)

    def write_json(self, rel: str | Path, doc: Any) -> Path:
        return self.write_bytes(rel, (json.dumps(doc, indent=2, default=_json_default) + "\n").encode())

    def append_line(self, rel: str | Path, doc: dict) -> None:
        line = (json.dumps(doc, default=_json_default) + "\n").encode()
        fd = os.open(self.path(rel), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write: never interleaves with the host's own lines
        finally:
            os.close(fd)

    def event(self, kind: str, **fields: Any) -> None:
        ts = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        self.append_line(EVENTS_FILE, {"ts": ts, "event": kind, "experiment_id": self.experiment_id, **fields})


def _json_default(obj: Any):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def environment_info() -> dict:
    """Versions and hardware for config/environment.json."""
    import lightning
    import torch

    cuda = torch.cuda.is_available()
    return {
        "core": core_version(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "numpy": np.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "image_id": os.environ.get("INFRA_IMAGE_ID"),
    }
