"""How experiments and studies are shown: `infra ls`'s fields, a study's points, short names.

Everything here reads what experiments left on disk (config/plan.json and metrics/metrics.json are
the training's output: untrusted, read through `runner.records`, shapes checked, text cleaned) and
the host's own records; only `study_status` and `stop_study` ask the engine (through reconcile).
"""

from __future__ import annotations

import os
import socket
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from runner.run.records import (
    ACTIVE,
    Experiment,
    RecordError,
    clean_text,
    experiments_root,
    kept_of,
    read_study,
    undefined_of,
)

MAIN_METRIC = ("test", "spearman")
SHORT_DATASET = 20  # characters of a data set name in `infra ls` (ProteinGym ids: see short_datasets)


def short_datasets(names: list[str | None], limit: int = SHORT_DATASET) -> dict[str, str]:
    """{name: what a narrow column shows} (pure).

    ProteinGym assay ids are `<UniProt entry>_<author>_<year>` (`BLAT_ECOLX_Stiffler_2015`); they are
    shown as the entry (`BLAT_ECOLX`) when that still tells every listed name apart; anything else
    longer than `limit` is cut with '…'.
    """
    distinct = sorted({n for n in names if n})
    entry = {n: "_".join(n.split("_")[:2]) for n in distinct if n.count("_") >= 3 or _proteingym(n)}
    unique = len(set(entry.values())) == len(entry) and not (set(entry.values()) & (set(distinct) - set(entry)))
    out = {}
    for n in distinct:
        short = entry[n] if unique and n in entry else n
        out[n] = short if len(short) <= limit else short[: limit - 1] + "…"
    return out


def _proteingym(name: str) -> bool:
    parts = name.split("_")
    return len(parts) >= 3 and parts[-1].isdigit() and len(parts[-1]) == 4


def short_paths(paths: list[str | None]) -> dict[str, str]:
    """{path: its file name} when the file names tell the distinct paths apart, else {path: path} (pure)."""
    distinct = sorted({p for p in paths if p})
    names = {p: Path(p).name or p for p in distinct}
    if len(set(names.values())) == len(names):
        return names
    return {p: p for p in distinct}


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def duration_s(record: dict, now: datetime | None = None) -> float | None:
    """Seconds from started_at to finished_at; to now while the experiment is active; else None."""
    start = parse_time(record.get("started_at"))
    end = parse_time(record.get("finished_at"))
    if end is None and record.get("state") in ACTIVE:
        end = now or datetime.now(UTC)
    if start is None or end is None or end < start:
        return None
    return round((end - start).total_seconds(), 3)


def duration_text(seconds: float | None) -> str:
    """`42s`, `3m05s`, `2h03m`, `1d04h`; `-` for None (pure)."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def created_text(value: Any) -> str:
    """`2026-12-06 04:46` (UTC, as the record) from an ISO time; the text cut otherwise."""
    parsed = parse_time(value)
    return parsed.astimezone(UTC).strftime("%Y-%m-%d %H:%M") if parsed else (clean_text(value, 16) or "")


def metric_text(value: Any, undefined: bool) -> str:
    """A metric in a cell: 4 decimals, `undef` when the training said it has no value, `-` without one."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:.4f}"
    return "undef" if undefined else "-"


def listing_fields(record: dict) -> dict:
    """What `infra ls` adds to a record: model, dataset (whole), kept, undefined, test_spearman (null
    when missing or undefined), duration_s. Metrics only of a succeeded experiment."""
    from runner.run.compare import dataset_of

    exp_dir = record.get("exp_dir")
    exp = Experiment(Path(exp_dir)) if isinstance(exp_dir, str) else None
    plan = exp.read_json("config/plan.json") if exp else {}
    model = plan.get("model") if isinstance(plan.get("model"), dict) else {}
    metrics = exp.read_json("metrics/metrics.json") if exp and record.get("state") == "succeeded" else {}
    split, name = MAIN_METRIC
    values = metrics.get(split) if isinstance(metrics.get(split), dict) else {}
    value = values.get(name)
    return {
        "model": clean_text(model.get("name"), 64),
        "dataset": dataset_of(plan),
        "kept": kept_of(metrics),
        "undefined": undefined_of(metrics),
        f"{split}_{name}": value if isinstance(value, int | float) and not isinstance(value, bool) else None,
        "duration_s": duration_s(record),
    }


# --- studies ------------------------------------------------------------------------------------------


def _point_records(workdir: Path, points: list[dict]) -> list[dict | None]:
    """Each point's reconciled record (None: never run; {"state": "unreadable", …} when damaged)."""
    from runner.run.backends import backend_of
    from runner.run.reconcile import reconcile

    backends: dict = {}
    out: list[dict | None] = []
    for point in points:
        eid = point["experiment_id"]
        exp = Experiment(experiments_root(workdir) / eid) if eid else None
        if exp is None or not exp.exists():
            out.append(None)
            continue
        try:
            record = exp.read()
            if record.get("state") in ACTIVE:
                record = reconcile(exp, backend_of(record, backends))
        except RecordError as exc:
            record = {"experiment_id": eid, "state": "unreadable", "message": exc.message, "exp_dir": str(exp.root)}
        out.append(record)
    return out


def study_status(workdir: Path, sid: str) -> dict:
    """A study and its points as `infra status STUDY` shows them: the study record's fields, then
    `points`: [{index, values, experiment_id, state ("not run" without an experiment), test_spearman,
    undefined, kept, duration_s}], and `states`: {state: count}."""
    doc = read_study(workdir, sid)
    return _with_points(doc, _point_records(workdir, doc["points"]))


def _with_points(doc: dict, records: list[dict | None]) -> dict:
    points = []
    for point, record in zip(doc["points"], records, strict=True):
        row = {"index": point["index"], "values": point["values"], "experiment_id": point["experiment_id"]}
        if record is None:
            row.update(state="not run", test_spearman=None, undefined={}, kept=None, duration_s=None)
        else:
            fields = listing_fields(record)
            row.update(state=record.get("state"), **{k: fields[k] for k in ("test_spearman", "undefined", "kept")})
            row["duration_s"] = fields["duration_s"]
        points.append(row)
    states: dict[str, int] = {}
    for p in points:
        states[str(p["state"])] = states.get(str(p["state"]), 0) + 1
    return {**doc, "points": points, "states": states}


def study_runner(records: list[dict | None]) -> int | None:
    """The pid of the study's runner (`infra run --sweep`) when it runs on this host, else None."""
    from runner.run.reconcile import pid_alive

    host = socket.gethostname()
    pids = {r.get("runner_pid") for r in records if r and r.get("host") == host}
    alive = [p for p in pids if isinstance(p, int) and p > 0 and p != os.getpid() and pid_alive(p)]
    return max(alive) if alive else None


def stop_study(workdir: Path, sid: str, timeout: int, reason: str) -> dict:
    """Stop every active point of a study (each as `infra stop`, all at once), then its status.

    The study's runner is asked first (`runner.run.study.request_study_stop`) to start no further
    point. Adds `stopped`: the ids that were active, and `runner`: the pid of the study's runner when
    it still runs on this host (it ends once its points are stopped).
    """
    from runner.run.launch import stop_experiment
    from runner.run.study import request_study_stop

    doc = read_study(workdir, sid)
    request_study_stop(workdir, sid, reason)  # its runner starts no further point
    records = _point_records(workdir, doc["points"])
    active = [r["experiment_id"] for r in records if r and r.get("state") in ACTIVE]

    def stop(eid: str) -> None:
        stop_experiment(Experiment(experiments_root(workdir) / eid), timeout=timeout, reason=reason)

    if active:
        with ThreadPoolExecutor(max_workers=min(8, len(active))) as pool:
            list(pool.map(stop, active))
    records = _point_records(workdir, doc["points"])
    return {**_with_points(doc, records), "stopped": active, "runner": study_runner(records)}


def study_list(workdir: Path) -> list[dict]:
    """Every study of the workdir, newest first: {study_id, name, created_at, points, states}
    (states from the records as they are, without asking the engine; `infra status STUDY` does)."""
    from runner.run.records import study_ids

    out = []
    for sid in study_ids(workdir):
        try:
            doc = read_study(workdir, sid)
        except RecordError as exc:
            out.append({"study_id": sid, "name": None, "created_at": None, "points": 0, "states": {},
                        "message": exc.message})  # fmt: skip
            continue
        states: dict[str, int] = {}
        for point in doc["points"]:
            exp = Experiment(experiments_root(workdir) / point["experiment_id"]) if point["experiment_id"] else None
            try:
                state = exp.read()["state"] if exp and exp.exists() else "not run"
            except RecordError:
                state = "unreadable"
            states[state] = states.get(state, 0) + 1
        out.append({"study_id": sid, "name": doc["name"], "created_at": doc["created_at"],
                    "points": len(doc["points"]), "states": states})  # fmt: skip
    return sorted(out, key=lambda d: str(d.get("created_at") or ""), reverse=True)
