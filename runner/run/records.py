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
import math
import os
import socket
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from runner import __version__, safefs
from runner.errors import InfraError, UnknownExperiment, UsageError

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
STUDIES_DIR = "studies"  # <workdir>/studies/<study id>.json, written by runner.run.study (same name there)
# experiments/ and every experiment directory: only their owner may enter them (docs/security.md), so
# nothing a training left inside is reachable by another local user even if the host missed it.
PRIVATE_DIR_MODE = 0o700
AMBIGUOUS_SHOWN = 4  # ids named in the error for an ambiguous prefix
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
    """`<name>-<first 10 hex of sha256(canonical plan + image content hash + db identity [+ weights])>`.

    The database's size and mtime stand in for its content so re-importing data under the same
    path makes a new experiment, without hashing gigabytes on every run. A plan with the `plm`
    embedding also hashes in its model's content hash from the node's model store
    (`runner.modelstore.plan_weights`: the errors of a missing model or store), so other weights
    added under the same name make a new experiment; for other plans nothing is added.
    """
    from runner.modelstore import plan_weights

    if resolved.get("experiment_id"):
        return resolved["experiment_id"]
    weights = plan_weights(resolved)
    plan = {k: v for k, v in resolved.items() if k not in ID_EXCLUDED_KEYS}
    db = Path(resolved["data"]["db"])
    try:
        st = db.stat()
        db_identity = f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        db_identity = "missing"
    text = f"{canonical_json(plan)}\n{image_hash}\n{db_identity}" + (f"\nweights:{weights}" if weights else "")
    digest = hashlib.sha256(text.encode()).hexdigest()
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
        """The top folder and the folders the training writes (walked without following links).

        `experiments/` and the experiment directory are made private (PRIVATE_DIR_MODE): the
        container still reaches its output folders, each bind-mounted on its own.
        """
        make_private_dir(self.root.parent)
        make_private_dir(self.root)
        for sub in MOUNTED_DIRS:
            with safefs.open_dir(self.root, sub, create=True):
                pass


def make_private_dir(path: Path) -> None:
    """`path` as a folder only its owner can enter: created 0700 (parents as usual), or narrowed to
    its owner's bits when it exists and is ours (existing experiments become private too)."""
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    st = os.stat(path)  # experiments/ may be a link the workdir's owner made to another disk
    if stat.S_IMODE(st.st_mode) & 0o077 and st.st_uid == os.geteuid():
        os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o077)


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


def experiment_ids(workdir: Path) -> list[str]:
    """The ids of the workdir's experiments, sorted (names only: no record is read)."""
    root = experiments_root(workdir)
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    return sorted(
        e.name for e in entries if e.is_dir(follow_symlinks=False) and os.path.lexists(Path(e.path) / STATUS_FILE)
    )


def study_ids(workdir: Path) -> list[str]:
    """The ids of the workdir's studies (`studies/<id>.json`), sorted (names only)."""
    try:
        entries = list(os.scandir(Path(workdir) / STUDIES_DIR))
    except OSError:
        return []
    return sorted(e.name[:-5] for e in entries if e.name.endswith(".json") and e.is_file(follow_symlinks=False))


def resolve_id(workdir: Path, text: str, kinds: tuple[str, ...] = ("experiment",)) -> tuple[str, str]:
    """(kind, the whole id) for an id or a unique prefix of one, git-style; `kinds`: which ids count,
    "experiment" (`experiments/<id>/`) and/or "study" (`studies/<id>.json`).

    A whole id wins over longer ids it is a prefix of. A prefix that fits several ids is a UsageError
    (exit 2) naming the first few; one that fits none is UnknownExperiment (exit 4), like an unknown
    whole id. Only names are listed (no record is read), so this stays fast in a large workdir.
    """
    what = " or ".join(kinds)
    if "/" in text or text in ("", ".", "..") or "\x00" in text:
        raise UnknownExperiment(f"no {what} {text[:80]!r}: not a valid {what} id")
    # a whole id is taken as it is (what lies there is checked by whoever opens it: a link is refused)
    if "experiment" in kinds and os.path.lexists(experiments_root(workdir) / text / STATUS_FILE):
        return "experiment", text
    if "study" in kinds and os.path.lexists(Path(workdir) / STUDIES_DIR / f"{text}.json"):
        return "study", text
    known = [("experiment", i) for i in experiment_ids(workdir)] if "experiment" in kinds else []
    if "study" in kinds:
        known += [("study", i) for i in study_ids(workdir)]
    matches = [k for k in known if k[1].startswith(text)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        if kinds == ("study",):
            raise UnknownExperiment(
                f"no study {text[:80]!r} in {Path(workdir) / STUDIES_DIR}; list them with 'infra ls --studies'"
            )
        also = " (studies: 'infra ls --studies')" if "study" in kinds else ""
        raise UnknownExperiment(
            f"no experiment {text[:80]!r} in {experiments_root(workdir)}; list them with 'infra ls'{also}"
        )
    shown = ", ".join(i for _, i in matches[:AMBIGUOUS_SHOWN])
    more = f" and {len(matches) - AMBIGUOUS_SHOWN} more" if len(matches) > AMBIGUOUS_SHOWN else ""
    found = {k for k, _ in matches}
    noun = "experiments" if found == {"experiment"} else "studies" if found == {"study"} else "experiments and studies"
    raise UsageError(
        f"id prefix {text[:80]!r} is ambiguous: {len(matches)} {noun} start with it: {shown}{more}; type more of the id"
    )


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
                k: v
                for k, v in value.items()
                if printable_key(k)  # metric names are printed as column headers
                if isinstance(v, int | float | None) and not isinstance(v, bool)
            }
    return out


# --- what the training kept, and which metrics are undefined (metrics.json, untrusted) ----------------

KEPT_MODELS = ("start", "epoch", "closed_form")
TEXT_LIMIT = 300  # characters kept of a reason the training wrote
MAX_UNDEFINED = 64


def clean_text(value: Any, limit: int = TEXT_LIMIT) -> str | None:
    """An untrusted string made printable on one line (escape sequences and control characters
    removed, tabs and newlines as spaces) and cut to `limit` characters; None for anything else."""
    from runner.lines import terminal_safe

    if not isinstance(value, str):
        return None
    text = terminal_safe(value[: limit * 4].replace("\t", " ").replace("\n", " ").replace("\r", " "))
    return text[: limit - 1] + "…" if len(text) > limit else text


def printable_key(key: Any) -> bool:
    """Whether an untrusted JSON key may be shown as it is: at most 64 characters, nothing to clean. A key
    that is not is dropped, never cleaned: cleaned, it could pass for another (`\x1b[2Jspearman`)."""
    return isinstance(key, str) and len(key) <= 64 and clean_text(key, 64) == key


def _finite_number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return value
    return None


def _epoch(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**7 else None


def kept_of(metrics: dict) -> dict | None:
    """metrics.json's `kept` with its shape checked: {model, epoch, by, value, best_trained, why, warning}.

    `epoch` counts from 0, as every epoch in the training's files. An experiment from before `kept`
    existed gets one from its `selected` ("start" or "epoch") and `best_epoch`, the rest null; None
    when neither says what was kept.
    """
    kept = metrics.get("kept")
    if isinstance(kept, dict) and kept.get("model") in KEPT_MODELS:
        best = kept.get("best_trained")
        best_trained = None
        if isinstance(best, dict):
            best_trained = {
                "epoch": _epoch(best.get("epoch")),
                "value": _finite_number(best.get("value")),
                "start_z": _finite_number(best.get("start_z")),
            }
        return {
            "model": kept["model"],
            "epoch": _epoch(kept.get("epoch")),
            "by": clean_text(kept.get("by"), 40),
            "value": _finite_number(kept.get("value")),
            "best_trained": best_trained,
            "why": clean_text(kept.get("why")),
            "warning": clean_text(kept.get("warning")),
        }
    selected = metrics.get("selected")
    if selected in ("start", "epoch"):
        epoch = _epoch(metrics.get("best_epoch")) if selected == "epoch" else None
        return {"model": selected, "epoch": epoch, "by": None, "value": None, "best_trained": None,
                "why": None, "warning": None}  # fmt: skip
    return None


def kept_text(kept: dict | None) -> str:
    """What the model is, in a table cell: `start`, `epoch 3` (counted from 1, as `infra run` shows
    epochs), `closed form`; `-` when not known."""
    if not kept:
        return "-"
    if kept["model"] == "epoch":
        return "epoch" if kept.get("epoch") is None else f"epoch {kept['epoch'] + 1}"
    return "closed form" if kept["model"] == "closed_form" else str(kept["model"])


def kept_kind(kept: dict | None) -> str:
    """`start`, `epoch`, `closed form` or `-`: what kind of model was kept, without the epoch."""
    return "-" if not kept else "closed form" if kept["model"] == "closed_form" else str(kept["model"])


def undefined_of(metrics: dict) -> dict[str, str]:
    """{"test.spearman": reason, …}: the metrics the training could compute no value for.

    From metrics.json's `undefined` (reasons cut and cleaned), and any val/test metric whose value is
    null without a reason there (how experiments from before `undefined` existed recorded it).
    """
    out: dict[str, str] = {}
    given = metrics.get("undefined")
    if isinstance(given, dict):
        for key, reason in list(given.items())[:MAX_UNDEFINED]:
            if isinstance(key, str) and key.partition(".")[0] in ("val", "test", "train"):
                out[clean_text(key, 64)] = clean_text(reason, 120) or "undefined"
    for split in ("val", "test"):
        values = metrics.get(split)
        if isinstance(values, dict):
            for name, value in list(values.items())[:MAX_UNDEFINED]:
                if value is None and isinstance(name, str):
                    out.setdefault(f"{split}.{clean_text(name, 60)}", "undefined")
    return out


def outcome_summary(exp_dir: Path) -> dict:
    """{"kept": kept_of(…) or None, "undefined": undefined_of(…)} of an experiment's metrics.json."""
    metrics = Experiment(Path(exp_dir)).read_json("metrics/metrics.json")
    return {"kept": kept_of(metrics), "undefined": undefined_of(metrics)}


# --- studies (`<workdir>/studies/<id>.json`, written by runner.run.study) ------------------------------

STUDY_LIMIT = 8 << 20
MAX_STUDY_POINTS = 100_000


def read_study(workdir: Path, sid: str) -> dict:
    """A study's record with its shape checked: {study_id, name, source, keys, created_at, backend,
    points: [{index, values, experiment_id}]}; UnknownExperiment when there is none, RecordError
    when it cannot be used."""
    root = Path(workdir) / STUDIES_DIR
    where = root / f"{sid}.json"
    try:
        doc = json.loads(safefs.read_bytes(root, f"{sid}.json", limit=STUDY_LIMIT).decode("utf-8"))
    except FileNotFoundError:
        raise UnknownExperiment(f"no study {sid!r} in {root}; list them with 'infra ls --studies'") from None
    except (safefs.Tampered, safefs.TooLarge) as exc:
        raise RecordError(exc.message) from None
    except (OSError, UnicodeDecodeError, ValueError):
        raise RecordError(f"{where}: not a readable study record (JSON); remove it or run the study again") from None
    points = doc.get("points") if isinstance(doc, dict) else None
    if not isinstance(points, list):
        raise RecordError(f"{where}: not a study record ('points' missing or not a list)")
    out = []
    for i, point in enumerate(points[:MAX_STUDY_POINTS], 1):
        point = point if isinstance(point, dict) else {}
        eid = point.get("experiment_id")
        ok = isinstance(eid, str) and eid and "/" not in eid and eid not in (".", "..")
        values = point.get("values")
        out.append({
            "index": point["index"] if isinstance(point.get("index"), int) else i,
            "values": values if isinstance(values, dict) else {},
            "experiment_id": eid if ok else None,
        })  # fmt: skip
    keys = doc.get("keys")
    return {
        "study_id": sid,
        "name": clean_text(doc.get("name"), 64),
        "source": clean_text(doc.get("source"), 200),
        "keys": [clean_text(k, 64) for k in keys if isinstance(k, str)] if isinstance(keys, list) else [],
        "created_at": clean_text(doc.get("created_at"), 40),
        "backend": clean_text(doc.get("backend"), 16),
        "points": out,
    }
