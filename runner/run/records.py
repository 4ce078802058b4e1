"""Experiment records on disk: ids, the directory layout, `status.json` and `events.jsonl` (DESIGN §6).

The record is the runner's memory of an experiment; `runner.run.reconcile` reconciles it with the engine
every time it is read. `status.json` is only ever replaced atomically; `events.jsonl` is only ever
appended whole lines (the training core appends its progress events to the same file).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from runner import __version__
from runner.errors import UnknownExperiment

STATES = ("created", "building", "starting", "running", "succeeded", "failed", "cancelled", "lost")
TERMINAL = frozenset({"succeeded", "failed", "cancelled", "lost"})
ACTIVE = frozenset({"building", "starting", "running"})
LAYOUT_DIRS = ("config", "data", "splits", "embeddings", "logs", "metrics", "ckpts", "artifacts/visualization")
# Keys that do not change what an experiment computes; excluded from the derived id.
ID_EXCLUDED_KEYS = ("experiment_id", "resources")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def canonical_json(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def plan_sha256(resolved: dict) -> str:
    return hashlib.sha256(canonical_json(resolved).encode()).hexdigest()


def derive_experiment_id(resolved: dict, image_hash: str) -> str:
    """`<name>-<first 10 hex of sha256(canonical plan + image content hash + db identity)>`.

    The database's size and mtime stand in for its content so re-importing data under the same
    path makes a new experiment, without hashing gigabytes on every run.
    """
    if resolved.get("experiment_id"):
        return resolved["experiment_id"]
    plan = {k: v for k, v in resolved.items() if k not in ID_EXCLUDED_KEYS}
    db = Path(resolved["data"]["db"])
    try:
        st = db.stat()
        db_identity = f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        db_identity = "missing"
    digest = hashlib.sha256(f"{canonical_json(plan)}\n{image_hash}\n{db_identity}".encode()).hexdigest()
    return f"{resolved['name']}-{digest[:10]}"


def experiments_root(workdir: Path) -> Path:
    return Path(workdir) / "experiments"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file + rename, so readers see the old or the new file, never half of one.

    The file gets the usual 0666 & ~umask mode (mkstemp alone would leave it 0600).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, doc: Any) -> None:
    atomic_write_text(path, json.dumps(doc, indent=2, default=str) + "\n")


@dataclass
class Experiment:
    """One experiment directory and its record."""

    root: Path

    @property
    def id(self) -> str:
        return self.root.name

    @property
    def status_path(self) -> Path:
        return self.root / "status.json"

    @property
    def events_path(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def container_log(self) -> Path:
        return self.root / "logs" / "container.log"

    @property
    def lock_path(self) -> Path:
        return self.root.parent / ".locks" / f"{self.id}.lock"

    def exists(self) -> bool:
        return self.status_path.exists()

    def read(self) -> dict:
        try:
            return json.loads(self.status_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UnknownExperiment(
                f"no experiment {self.id!r} in {self.root.parent}; list them with 'infra ls'"
            ) from None

    def write(self, record: dict) -> dict:
        record["updated_at"] = now_iso()
        atomic_write_json(self.status_path, record)
        return record

    def update(self, **fields) -> dict:
        record = self.read()
        old_state = record.get("state")
        record.update(fields)
        self.write(record)
        if "state" in fields and fields["state"] != old_state:
            self.event(
                "state",
                state=fields["state"],
                attempt=record.get("attempt"),
                **{k: v for k, v in fields.items() if k in ("exit_code", "message", "container_id")},
            )
        return record

    def event(self, kind: str, **fields) -> dict:
        """Append one event line (a single write call, so concurrent appenders never interleave)."""
        doc = {"ts": now_iso(), "event": kind, "experiment_id": self.id, **fields}
        line = (json.dumps(doc, default=str) + "\n").encode()
        self.events_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.events_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        return doc

    def events(self) -> list[dict]:
        try:
            lines = self.events_path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def make_layout(self) -> None:
        for sub in LAYOUT_DIRS:
            (self.root / sub).mkdir(parents=True, exist_ok=True)


def new_record(exp: Experiment, *, name: str, backend: str, plan_sha: str, attempt: int, previous: dict | None) -> dict:
    """The status document of a fresh attempt (keeps the first creation time across attempts)."""
    created = (previous or {}).get("created_at") or now_iso()
    return {
        "experiment_id": exp.id,
        "name": name,
        "state": "created",
        "attempt": attempt,
        "backend": backend,
        "exp_dir": str(exp.root),
        "plan_sha256": plan_sha,
        "image": None,
        "image_id": None,
        "container_id": None,
        "pid": None,
        "exit_code": None,
        "message": None,
        "host": socket.gethostname(),
        "infra_version": __version__,
        "created_at": created,
        "started_at": None,
        "finished_at": None,
        "updated_at": None,
    }


def find(workdir: Path, experiment_id: str) -> Experiment:
    """The experiment with this id; UnknownExperiment (exit 4) when there is none."""
    if "/" in experiment_id or experiment_id in ("", ".", ".."):
        raise UnknownExperiment(f"no experiment {experiment_id!r}: not a valid experiment id")
    exp = Experiment(experiments_root(workdir) / experiment_id)
    if not exp.exists():
        raise UnknownExperiment(
            f"no experiment {experiment_id!r} in {experiments_root(workdir)}; list them with 'infra ls'"
        )
    return exp


def all_experiments(workdir: Path) -> list[Experiment]:
    root = experiments_root(workdir)
    if not root.is_dir():
        return []
    return sorted(
        (Experiment(p) for p in root.iterdir() if p.is_dir() and (p / "status.json").exists()),
        key=lambda e: e.id,
    )
