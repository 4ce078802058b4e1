"""Experiment records on disk: ids, the directory layout, `status.json` and `events.jsonl` (DESIGN §6).

The record is the runner's memory of an experiment; `runner.run.reconcile` reconciles it with the
engine every time it is read. The host's own files (`status.json`, `events.jsonl`, `container.log`)
sit at the top of the experiment directory, which is never mounted into the container: training
code can write only the output folders (`MOUNTED_DIRS`). They are still opened through
`runner.safefs` (no links followed, sizes capped), and a record that does not parse is reported as
unreadable, never trusted. `status.json` is only ever replaced atomically; `events.jsonl` is only
ever appended whole lines.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from runner import __version__, safefs
from runner.errors import InfraError, UnknownExperiment

log = logging.getLogger(__name__)

STATES = ("created", "building", "starting", "running", "succeeded", "failed", "cancelled", "lost")
TERMINAL = frozenset({"succeeded", "failed", "cancelled", "lost"})
ACTIVE = frozenset({"building", "starting", "running"})
# The folders the training writes, each bind-mounted at /exp/<name>; nothing else of the experiment
# directory is visible in the container.
MOUNTED_DIRS = ("config", "data", "splits", "embeddings", "logs", "metrics", "ckpts", "artifacts")
STATUS_FILE = "status.json"
EVENTS_FILE = "events.jsonl"
CONTAINER_LOG = "container.log"
RECORD_LIMIT = 1 << 20  # a status.json larger than this is not one infra wrote
# Keys that do not change what an experiment computes (where it runs, where results are reported);
# excluded from the derived id.
ID_EXCLUDED_KEYS = ("experiment_id", "resources", "tracking")


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


class RecordError(InfraError):
    """An experiment's `status.json` cannot be used: unreadable, not JSON, or not a record (exit 1)."""

    exit_code = 1


RECORD_TYPES = {"experiment_id": str, "state": str, "attempt": int, "backend": str}


def check_record(doc: Any, where: Path) -> dict:
    """The record if it has the shape infra writes (the keys every reader relies on), else RecordError."""
    if not isinstance(doc, dict):
        raise RecordError(f"{where}: not an infra record (a JSON object is expected)")
    for key, kind in RECORD_TYPES.items():
        if not isinstance(doc.get(key), kind) or isinstance(doc.get(key), bool):
            raise RecordError(f"{where}: not an infra record ({key!r} missing or not a {kind.__name__})")
    if doc["state"] not in STATES:
        raise RecordError(f"{where}: unknown state {doc['state'][:40]!r}")
    return doc


@dataclass
class Experiment:
    """One experiment directory and its record (the host-only files at its top)."""

    root: Path

    @property
    def id(self) -> str:
        return self.root.name

    @property
    def status_path(self) -> Path:
        return self.root / STATUS_FILE

    @property
    def events_path(self) -> Path:
        return self.root / EVENTS_FILE

    @property
    def container_log(self) -> Path:
        return self.root / CONTAINER_LOG

    @property
    def lock_path(self) -> Path:
        return self.root.parent / ".locks" / f"{self.id}.lock"

    def exists(self) -> bool:
        return os.path.lexists(self.status_path)

    def read(self) -> dict:
        """The record; UnknownExperiment when there is none, RecordError when it cannot be used."""
        try:
            data = safefs.read_bytes(self.root, STATUS_FILE, limit=RECORD_LIMIT)
        except FileNotFoundError:
            raise UnknownExperiment(
                f"no experiment {self.id!r} in {self.root.parent}; list them with 'infra ls'"
            ) from None
        except (safefs.Tampered, safefs.TooLarge) as exc:
            raise RecordError(exc.message) from None
        except OSError as exc:
            raise RecordError(f"{self.status_path}: cannot be read ({exc.strerror})") from None
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise RecordError(f"{self.status_path}: not valid JSON; the record is damaged") from None
        return check_record(doc, self.status_path)

    def write(self, record: dict) -> dict:
        record["updated_at"] = now_iso()
        safefs.write_atomic(self.root, STATUS_FILE, (json.dumps(record, indent=2, default=str) + "\n").encode())
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
        fd = safefs.open_append(self.root, EVENTS_FILE)
        try:
            os.write(fd, (json.dumps(doc, default=str) + "\n").encode())
        finally:
            os.close(fd)
        return doc

    def events(self, limit: int = 64 << 20) -> list[dict]:
        """The host's events (lines that are not JSON objects are skipped)."""
        try:
            data = safefs.read_bytes(self.root, EVENTS_FILE, limit=limit)
        except FileNotFoundError:
            return []
        out = []
        for line in data.decode("utf-8", errors="replace").splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict):
                out.append(doc)
        return out

    def read_json(self, rel: str, limit: int = safefs.DEFAULT_READ_LIMIT) -> dict:
        """A JSON object the training wrote (e.g. metrics/metrics.json); {} when missing or unusable.

        Untrusted: read without following links, size-capped, and anything but an object is {}.
        """
        try:
            doc = json.loads(safefs.read_bytes(self.root, rel, limit=limit).decode("utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, UnicodeDecodeError, InfraError) as exc:
            log.warning("%s: ignored (%s)", self.root / rel, exc)
            return {}
        return doc if isinstance(doc, dict) else {}

    def make_layout(self) -> None:
        """The top folder and the folders the training writes (walked without following links)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in MOUNTED_DIRS:
            with safefs.open_dir(self.root, sub, create=True):
                pass


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
        (
            Experiment(p)
            for p in root.iterdir()
            if p.is_dir() and not p.is_symlink() and os.path.lexists(p / STATUS_FILE)
        ),
        key=lambda e: e.id,
    )


def metrics_summary(exp_dir: Path) -> dict:
    """{"test", "val", "n"} of an experiment's metrics/metrics.json, each kept only when it is an object
    of numbers (the file is the training's output: untrusted); {} when there is none."""
    metrics = Experiment(Path(exp_dir)).read_json("metrics/metrics.json")
    out = {}
    for key in ("test", "val", "n"):
        value = metrics.get(key)
        if isinstance(value, dict):
            out[key] = {
                str(k)[:64]: v
                for k, v in value.items()
                if isinstance(v, int | float | None) and not isinstance(v, bool)
            }
    return out
