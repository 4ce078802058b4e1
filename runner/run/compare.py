"""`infra compare`: one metrics table across experiments of a workdir, sorted by a chosen metric.

Reads what the experiments left on disk (status.json, config/plan.json, metrics/metrics.json); it
never contacts the engine, so it works for finished experiments on any machine that sees the
workdir. An experiment without metrics (failed, still running) is listed with empty metric cells.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from runner.errors import UsageError
from runner.run.records import Experiment, RecordError, all_experiments, find, metrics_summary

log = logging.getLogger(__name__)

LOWER_IS_BETTER = frozenset({"mse", "rmse", "mae"})  # every other built-in metric: higher is better
SPLITS = ("test", "val")


def experiment_row(exp: Experiment) -> dict[str, Any]:
    """One experiment as a comparison row: id, name, state, model/embedding names, metrics, sizes, seconds."""
    try:
        record = exp.read()
    except RecordError as exc:
        record = {"state": "unreadable", "message": exc.message}
    plan = exp.read_json("config/plan.json")
    metrics = exp.read_json("metrics/metrics.json")
    summary = metrics_summary(exp.root)
    n = summary.get("n") or {}
    return {
        "experiment_id": exp.id,
        "name": record.get("name") or _component(plan, "name"),
        "state": record.get("state"),
        "model": _component(plan.get("model"), "name"),
        "embedding": _component(plan.get("embeddings"), "name"),
        "test": summary.get("test") or {},
        "val": summary.get("val") or {},
        "n": {k: n[k] for k in ("train", "val", "test", "selected") if k in n},
        "training_seconds": _number(metrics.get("training_seconds")),
        "epochs": _number(metrics.get("epochs")),
        "exp_dir": str(exp.root),
    }


def _component(doc, key: str) -> str | None:
    """A short string from an untrusted JSON object, else None."""
    value = doc.get(key) if isinstance(doc, dict) else None
    return value[:64] if isinstance(value, str) else None


def _number(value):
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def parse_metric(metric: str) -> tuple[str, str]:
    """`spearman` → ("test", "spearman"); `val.spearman` → ("val", "spearman")."""
    split, dot, name = metric.partition(".")
    if dot and split in SPLITS and name:
        return split, name
    if dot:
        raise UsageError(f"--metric {metric!r}: use NAME (sorts by test NAME) or test.NAME / val.NAME")
    return "test", metric


def sort_rows(rows: list[dict], metric: str) -> list[dict]:
    """Best first by `metric` (lower first for mse/rmse/mae); rows without the metric go last, by id."""
    split, name = parse_metric(metric)
    sign = 1.0 if name in LOWER_IS_BETTER else -1.0

    def key(row: dict):
        value = row[split].get(name)
        if not isinstance(value, int | float) or value != value:  # missing or NaN
            return (1, 0.0, row["experiment_id"])
        return (0, sign * value, row["experiment_id"])

    return sorted(rows, key=key)


def compare(workdir: Path, ids: list[str], metric: str = "spearman") -> list[dict]:
    """Rows for `ids` (every experiment of the workdir when empty), best first by `metric`.

    An unknown id raises UnknownExperiment (exit 4); a metric no experiment has raises UsageError
    listing the metrics that exist.
    """
    exps = [find(workdir, i) for i in dict.fromkeys(ids)] if ids else all_experiments(workdir)
    rows = [experiment_row(e) for e in exps]
    split, name = parse_metric(metric)
    have = sorted({m for r in rows for m in r[split]})
    if rows and have and name not in have:
        raise UsageError(f"--metric {metric!r}: no experiment has {split} {name}; available: {', '.join(have)}")
    return sort_rows(rows, metric)


def render_table(headers: list[str], rows: list[list[Any]]) -> str:
    """Left-aligned text columns; floats with 4 decimals, None as '-'."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4f}"
        return str(value)

    text = [headers, *[[cell(v) for v in row] for row in rows]]
    widths = [max(len(r[i]) for r in text) for i in range(len(headers))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in text)


def metric_columns(rows: list[dict], metric: str, limit: int = 6) -> list[str]:
    """Test metric names to show: the sort metric first, then the others in name order."""
    _, name = parse_metric(metric)
    names = sorted({m for r in rows for m in r["test"]})
    ordered = ([name] if name in names else []) + [m for m in names if m != name]
    return ordered[:limit]


def table(rows: list[dict], metric: str = "spearman") -> str:
    """The human table: id, state, model, embedding, test metrics, the val sort metric, sizes, seconds."""
    split, name = parse_metric(metric)
    shown = metric_columns(rows, metric)
    headers = ["experiment", "state", "model", "embedding", *[f"test.{m}" for m in shown]]
    extra = f"val.{name}" if split == "test" else f"{split}.{name}"
    headers += [extra, "n_train", "n_test", "train_s"]
    body = []
    for r in rows:
        val_split = "val" if split == "test" else split
        body.append(
            [
                r["experiment_id"],
                r["state"],
                r["model"],
                r["embedding"],
                *[r["test"].get(m) for m in shown],
                r[val_split].get(name),
                r["n"].get("train"),
                r["n"].get("test"),
                r["training_seconds"],
            ]
        )
    return render_table(headers, body)
