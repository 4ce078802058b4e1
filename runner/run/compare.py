"""`infra compare`: one metrics table across experiments of a workdir, with the plan keys that differ.

Reads what the experiments left on disk (status.json, config/plan.json, metrics/metrics.json) through
`runner.safefs` (untrusted: no links, size caps, shapes checked); it never contacts the engine, so it
works for finished experiments on any machine that sees the workdir. An experiment without metrics
(failed, still running) is listed with empty metric cells.

The plan of each experiment is flattened to dotted keys (`train.lr`, `model.params.hidden`); the
table gets a column for every key whose value is not the same in all compared experiments.
`--where KEY=VALUE` keeps experiments whose plan has that value; `--group-by KEY` folds experiments
that differ only in KEY (seeds, folds) into one row with the mean ± sd of each metric.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import statistics
from pathlib import Path
from typing import Any

from runner.errors import UsageError
from runner.run.records import Experiment, RecordError, all_experiments, find, metrics_summary

log = logging.getLogger(__name__)

LOWER_IS_BETTER = frozenset({"mse", "rmse", "mae"})  # every other built-in metric: higher is better
SPLITS = ("test", "val")
# Keys never shown as differences: the id is already a column, and the database path is where the
# data lives on this machine (data.dataset says which data it is).
IGNORED_KEYS = frozenset({"experiment_id"})
SHOWN_APART = frozenset({"model.name", "embeddings.name"})  # own columns: model, embedding
MAX_DEPTH = 8
MAX_KEYS = 1000
MAX_TEXT = 200


def flatten(
    doc: Any, prefix: str = "", out: dict | None = None, depth: int = 0, max_text: int = MAX_TEXT
) -> dict[str, Any]:
    """An untrusted JSON object as {dotted key: value}; lists and deep values become bounded JSON
    text, strings are cut to `max_text`, at most MAX_KEYS keys (pure). Also what MLflow's params are."""
    out = {} if out is None else out
    if not isinstance(doc, dict):
        return out
    for key, value in doc.items():
        if len(out) >= MAX_KEYS:
            break
        name = f"{prefix}{str(key)[:64]}"
        if isinstance(value, dict) and depth < MAX_DEPTH and value:
            flatten(value, name + ".", out, depth + 1, max_text)
        elif isinstance(value, str):
            out[name] = value[:max_text]
        elif value is None or isinstance(value, bool | int | float):
            out[name] = value
        else:
            out[name] = json.dumps(value, sort_keys=True, default=str)[:max_text]
    return out


def experiment_row(exp: Experiment) -> dict[str, Any]:
    """One experiment as a comparison row: id, name, state, model/embedding names, metrics, sizes,
    seconds, and `plan`: its flattened plan."""
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
        "plan": {k: v for k, v in flatten(plan).items() if k not in IGNORED_KEYS},
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


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def _sort_key(value, sign: float, tie: str):
    return (1, 0.0, tie) if not _finite(value) else (0, sign * value, tie)


def sort_rows(rows: list[dict], metric: str) -> list[dict]:
    """Best first by `metric` (lower first for mse/rmse/mae); rows without the metric go last, by id."""
    split, name = parse_metric(metric)
    sign = 1.0 if name in LOWER_IS_BETTER else -1.0
    return sorted(rows, key=lambda r: _sort_key(r[split].get(name), sign, r["experiment_id"]))


def parse_where(items: list[str]) -> list[tuple[str, Any]]:
    """`--where KEY=VALUE` items as (key, value); the value is JSON when it parses (like --set)."""
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--where {item!r}: expected KEY=VALUE, e.g. --where model.name=cnn")
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):
            value = raw
        out.append((key.strip(), value))
    return out


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def filter_rows(rows: list[dict], where: list[tuple[str, Any]]) -> list[dict]:
    """Rows whose flattened plan has every (key, value); a key no experiment has is a UsageError."""
    for key, _ in where:
        if rows and not any(key in r["plan"] for r in rows):
            keys = sorted({k for r in rows for k in r["plan"]})
            raise UsageError(f"--where {key}: no compared experiment has this plan key; keys: {', '.join(keys[:40])}")
    return [r for r in rows if all(key in r["plan"] and _same(r["plan"][key], v) for key, v in where)]


def differing_keys(rows: list[dict]) -> list[str]:
    """Plan keys whose value is not the same in every row (a key some rows lack counts), in plan order."""
    keys: dict[str, None] = {}
    for r in rows:
        keys.update(dict.fromkeys(r["plan"]))
    return [k for k in keys if any(not _same(r["plan"].get(k), rows[0]["plan"].get(k)) for r in rows[1:])]


def compare(
    workdir: Path,
    ids: list[str],
    metric: str = "spearman",
    where: list[str] | None = None,
) -> list[dict]:
    """Rows for `ids` (every experiment of the workdir when empty) that match `where`, best first.

    An unknown id raises UnknownExperiment (exit 4); a metric no experiment has raises UsageError
    listing the metrics that exist.
    """
    exps = [find(workdir, i) for i in dict.fromkeys(ids)] if ids else all_experiments(workdir)
    rows = filter_rows([experiment_row(e) for e in exps], parse_where(where or []))
    split, name = parse_metric(metric)
    have = sorted({m for r in rows for m in r[split]})
    if rows and have and name not in have:
        raise UsageError(f"--metric {metric!r}: no experiment has {split} {name}; available: {', '.join(have)}")
    return sort_rows(rows, metric)


def group_rows(rows: list[dict], by: list[str], metric: str) -> list[dict]:
    """Fold rows that differ only in the `by` keys into groups: {config: the other differing keys'
    values, n, experiments: ids, test/val: {metric: {mean, sd, n}}}, best mean first (pure).

    sd is the sample standard deviation (None for fewer than two values); experiments without a
    metric count in `n` but not in that metric's mean.
    """
    known = {k for r in rows for k in r["plan"]}
    for key in by:
        if rows and key not in known:
            raise UsageError(
                f"--group-by {key}: no compared experiment has this plan key (e.g. train.seed, split.fold)"
            )
    config_keys = [k for k in differing_keys(rows) if k not in by]
    groups: dict[str, dict] = {}
    for r in rows:
        config = {k: r["plan"].get(k) for k in config_keys}
        g = groups.setdefault(json.dumps(config, sort_keys=True, default=str), {"config": config, "rows": []})
        g["rows"].append(r)
    out = [_aggregate(g["config"], g["rows"], by) for g in groups.values()]
    split, name = parse_metric(metric)
    sign = 1.0 if name in LOWER_IS_BETTER else -1.0
    return sorted(out, key=lambda g: _sort_key((g[split].get(name) or {}).get("mean"), sign, g["experiments"][0]))


def _aggregate(config: dict, rows: list[dict], by: list[str]) -> dict:
    doc = {
        "config": config,
        "n": len(rows),
        "experiments": [r["experiment_id"] for r in rows],
        "grouped_over": {k: [r["plan"].get(k) for r in rows] for k in by},
        "model": rows[0]["model"],
        "embedding": rows[0]["embedding"],
    }
    for split in SPLITS:
        names = sorted({m for r in rows for m in r[split]})
        doc[split] = {}
        for m in names:
            values = [r[split][m] for r in rows if _finite(r[split].get(m))]
            doc[split][m] = {
                "mean": statistics.fmean(values) if values else None,
                "sd": statistics.stdev(values) if len(values) > 1 else None,
                "n": len(values),
            }
    return doc


def shown_value(value: Any) -> str:
    """A plan value in a cell: strings as they are, anything else as JSON (1e-05, true, null)."""
    return value if isinstance(value, str) else json.dumps(value)


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


def table_cells(rows: list[dict], metric: str = "spearman") -> tuple[list[str], list[list[Any]]]:
    """Headers and cells: id, state, model, embedding, the differing plan keys, test metrics, the val
    sort metric, sizes, seconds (the human table and the CSV)."""
    split, name = parse_metric(metric)
    shown = metric_columns(rows, metric)
    keys = [k for k in differing_keys(rows) if k not in SHOWN_APART]
    val_split = "val" if split == "test" else split
    headers = ["experiment", "state", "model", "embedding", *keys, *[f"test.{m}" for m in shown]]
    headers += [f"{val_split}.{name}", "n_train", "n_test", "train_s"]
    body = [
        [
            r["experiment_id"],
            r["state"],
            r["model"],
            r["embedding"],
            *[shown_value(r["plan"].get(k)) for k in keys],
            *[r["test"].get(m) for m in shown],
            r[val_split].get(name),
            r["n"].get("train"),
            r["n"].get("test"),
            r["training_seconds"],
        ]
        for r in rows
    ]
    return headers, body


def group_cells(groups: list[dict], metric: str = "spearman") -> tuple[list[str], list[list[Any]]]:
    """Headers and cells of grouped rows: the configuration keys, n (runs with the sort metric / runs),
    then mean and sd of each test metric."""
    names = sorted({m for g in groups for m in g["test"]})
    _, first = parse_metric(metric)
    names = ([first] if first in names else []) + [m for m in names if m != first]
    keys = [k for k in (groups[0]["config"] if groups else {}) if k not in SHOWN_APART]
    headers = ["model", "embedding", *keys, "n"]
    for m in names[:6]:
        headers += [f"test.{m}", "sd"]
    body = []
    for g in groups:
        counted = (g["test"].get(first) or {}).get("n", 0)
        cells = [g["model"], g["embedding"], *[shown_value(g["config"][k]) for k in keys], f"{counted}/{g['n']}"]
        for m in names[:6]:
            stat = g["test"].get(m) or {}
            cells += [stat.get("mean"), stat.get("sd")]
        body.append(cells)
    return headers, body


def table(rows: list[dict], metric: str = "spearman") -> str:
    """The human table of `table_cells`."""
    return render_table(*table_cells(rows, metric))


def group_table(groups: list[dict], metric: str = "spearman") -> str:
    return render_table(*group_cells(groups, metric))


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    # Plan values come from experiment directories: text a spreadsheet would run as a formula is quoted.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def to_csv(headers: list[str], body: list[list[Any]]) -> str:
    """CSV text: full-precision numbers, empty cells for missing values, formula-like text quoted."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([_csv_cell(h) for h in headers])
    writer.writerows([[_csv_cell(v) for v in row] for row in body])
    return buf.getvalue()
