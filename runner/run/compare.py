"""`infra compare`: experiments of a workdir (or of one study) as rows and groups of results.

Reads what the experiments left on disk (status.json, config/plan.json, metrics/metrics.json) through
`runner.safefs` (untrusted: no links, size caps, shapes checked); it never contacts the engine, so it
works for finished experiments on any machine that sees the workdir.

Decisions (docs/cli.md, "Comparing experiments"):

- Which experiments: the ids given (always shown, whatever their state), else a study's points
  (`--study`), else every experiment of the workdir; of the last two only the succeeded ones unless
  `--all`, and the caller says how many were left out.
- The plan of each experiment is flattened to dotted keys (`train.lr`, `model.params.hidden`). A key
  *differs* when its value is not the same in every compared experiment, with empty values (`{}`,
  `[]`, null) and a missing key taken as one value. Never shown as differences (`NOISE_KEYS`): the
  name and id (the id is a column), the `metrics` list (the metric columns say which exist), and
  `tracking.*` and `resources.*` (where results are reported and what the run was given: neither
  changes what it computes, which is why the experiment id leaves them out too).
- `data.db` is the host's path of the database: the record's `db` when it has one (older plans hold
  the container's `/data/…`).
- A metric that the training could not compute (`undefined` in metrics.json, or a null value) is
  undefined, not missing: it is counted, never averaged away. A group's cell says `mean ± sd (k/n)`:
  k points with a value of the n in the group.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.errors import UsageError
from runner.run.records import (
    Experiment,
    RecordError,
    all_experiments,
    clean_text,
    find,
    kept_kind,
    kept_of,
    metrics_summary,
    printable_key,
    read_study,
    undefined_of,
)

log = logging.getLogger(__name__)

LOWER_IS_BETTER = frozenset({"mse", "rmse", "mae"})  # every other built-in metric: higher is better
SPLITS = ("test", "val")
NOISE_KEYS = ("name", "experiment_id", "metrics", "tracking", "resources")
IDENTITY_KEYS = ("model.name", "embeddings.name", "data.dataset", "split.strategy")  # "same in all" line
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
        if not printable_key(key):  # a key becomes a column header
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict) and depth < MAX_DEPTH and value:
            flatten(value, name + ".", out, depth + 1, max_text)
        elif isinstance(value, str):
            out[name] = value[:max_text]
        elif value is None or isinstance(value, bool | int | float):
            out[name] = value
        else:
            out[name] = json.dumps(value, sort_keys=True, default=str)[:max_text]
    return out


def is_noise(key: str) -> bool:
    """Whether a plan key is never a difference worth a column (NOISE_KEYS and what lies under them)."""
    return any(key == n or key.startswith(n + ".") for n in NOISE_KEYS)


def normal(value: Any) -> Any:
    """A flattened plan value as compared: an empty object or list (as flattened: "{}", "[]") is null."""
    return None if value in ("{}", "[]") else value


def _same(a: Any, b: Any) -> bool:
    dump = lambda v: json.dumps(normal(v), sort_keys=True, default=str)  # noqa: E731
    return dump(a) == dump(b)


# --- rows ---------------------------------------------------------------------------------------------


def experiment_row(exp: Experiment) -> dict[str, Any]:
    """One experiment as a comparison row: id, name, state, model, embedding, dataset, metrics (test,
    val), `undefined` {metric: reason}, `kept`, sizes, seconds (those of a succeeded experiment only),
    and `plan`: its flattened plan."""
    try:
        record = exp.read()
    except RecordError as exc:
        record = {"state": "unreadable", "message": exc.message}
    plan = exp.read_json("config/plan.json")
    # a metrics.json beside a record that is not `succeeded` is an earlier attempt's: not this one's result
    succeeded = record.get("state") == "succeeded"
    metrics = exp.read_json("metrics/metrics.json") if succeeded else {}
    summary = metrics_summary(exp.root) if succeeded else {}
    n = summary.get("n") or {}
    flat = flatten(plan)
    if isinstance(record.get("db"), str) and "data.db" in flat:
        flat["data.db"] = record["db"][:MAX_TEXT]
    return {
        "experiment_id": exp.id,
        "name": record.get("name") or _component(plan, "name"),
        "state": record.get("state"),
        "model": _component(plan.get("model"), "name"),
        "embedding": _component(plan.get("embeddings"), "name"),
        "dataset": dataset_of(plan),
        "test": summary.get("test") or {},
        "val": summary.get("val") or {},
        "undefined": undefined_of(metrics),
        "kept": kept_of(metrics),
        "n": {k: n[k] for k in ("train", "val", "test", "selected") if k in n},
        "training_seconds": _number(metrics.get("training_seconds")),
        "epochs": _number(metrics.get("epochs")),
        "exp_dir": str(exp.root),
        "plan": flat,
    }


def _component(doc, key: str) -> str | None:
    """A short printable string from an untrusted JSON object, else None."""
    return clean_text(doc.get(key) if isinstance(doc, dict) else None, 64)


def dataset_of(plan: dict) -> str | None:
    """The plan's `data.dataset` as text (a list joined with '+'), else the database's file name."""
    data = plan.get("data") if isinstance(plan.get("data"), dict) else {}
    dataset = data.get("dataset")
    if isinstance(dataset, list):
        dataset = "+".join(d for d in dataset[:8] if isinstance(d, str))
    if not dataset and isinstance(data.get("db"), str):
        dataset = Path(data["db"]).name
    return clean_text(dataset, 120) or None


def _number(value):
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def parse_metric(metric: str) -> tuple[str, str]:
    """`spearman` → ("test", "spearman"); `val.spearman` → ("val", "spearman")."""
    split, dot, name = metric.partition(".")
    if dot and split in SPLITS and name:
        return split, name
    if dot:
        raise UsageError(f"--metric {metric!r}: use NAME (sorts by test NAME) or test.NAME / val.NAME")
    return "test", metric


def _sort_key(value, sign: float, tie: str):
    return (1, 0.0, tie) if not finite(value) else (0, sign * value, tie)


def sort_rows(rows: list[dict], metric: str) -> list[dict]:
    """Best first by `metric` (lower first for mse/rmse/mae); rows without a value go last, by id."""
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


def filter_rows(rows: list[dict], where: list[tuple[str, Any]]) -> list[dict]:
    """Rows whose flattened plan has every (key, value); a key no experiment has is a UsageError."""
    for key, _ in where:
        if rows and not any(key in r["plan"] for r in rows):
            keys = sorted({k for r in rows for k in r["plan"]})
            raise UsageError(f"--where {key}: no compared experiment has this plan key; keys: {', '.join(keys[:40])}")
    return [r for r in rows if all(key in r["plan"] and _same(r["plan"][key], v) for key, v in where)]


def differing_keys(rows: list[dict]) -> list[str]:
    """Plan keys, noise left out, whose (normalised) value is not the same in every row; in plan order."""
    keys: dict[str, None] = {}
    for r in rows:
        keys.update(dict.fromkeys(k for k in r["plan"] if not is_noise(k)))
    return [k for k in keys if any(not _same(r["plan"].get(k), rows[0]["plan"].get(k)) for r in rows[1:])]


def same_in_all(rows: list[dict]) -> dict[str, Any]:
    """The identifying keys (model, embedding, data set, split) that are the same in every row."""
    differing = set(differing_keys(rows))
    return {
        k: rows[0]["plan"][k]
        for k in IDENTITY_KEYS
        if rows and k not in differing and normal(rows[0]["plan"].get(k)) is not None
    }


@dataclass
class Comparison:
    """The compared rows, best first, and what was left out of them (for the caller to say)."""

    rows: list[dict]
    metric: str
    study: dict | None = None
    left_out: dict[str, int] = field(default_factory=dict)  # state -> experiments not shown (no --all)
    not_run: list[str] = field(default_factory=list)  # study points without an experiment directory


def compare(
    workdir: Path,
    ids: list[str],
    metric: str = "spearman",
    where: list[str] | None = None,
    study: str | None = None,
    include_all: bool = False,
) -> Comparison:
    """The rows of `ids` (whole ids: resolve prefixes first), else of the study `study`, else of every
    experiment of the workdir, that match `where`, best first.

    Of a study's or the workdir's experiments only the succeeded ones are kept unless `include_all`.
    An unknown id raises UnknownExperiment (exit 4); a metric no experiment has raises UsageError
    listing the metrics that exist.
    """
    if ids and study:
        raise UsageError("give experiment ids or --study, not both")
    doc = None
    not_run: list[str] = []
    if ids:
        exps = [find(workdir, i) for i in dict.fromkeys(ids)]
    elif study:
        doc = read_study(workdir, study)
        exps = []
        for point in doc["points"]:
            eid = point["experiment_id"]
            exp = Experiment(Path(workdir) / "experiments" / eid) if eid else None
            if exp is not None and exp.exists():
                exps.append(exp)
            else:
                not_run.append(eid or f"point {point['index']}")
    else:
        exps = all_experiments(workdir)
    rows = filter_rows([experiment_row(e) for e in exps], parse_where(where or []))
    left_out: dict[str, int] = {}
    if not ids and not include_all:
        for r in rows:
            if r["state"] != "succeeded":
                left_out[str(r["state"])] = left_out.get(str(r["state"]), 0) + 1
        rows = [r for r in rows if r["state"] == "succeeded"]
    split, name = parse_metric(metric)
    have = sorted({m for r in rows for m in r[split]})
    if rows and have and name not in have:
        raise UsageError(f"--metric {metric!r}: no experiment has {split} {name}; available: {', '.join(have)}")
    return Comparison(sort_rows(rows, metric), metric, doc, left_out, not_run)


# --- groups ---------------------------------------------------------------------------------------------


def stat(rows: list[dict], split: str, name: str) -> dict:
    """{mean, sd, n, of, undefined} of one metric over rows: n rows with a value of `of`; `undefined`
    counts the rows whose training said the metric has no value. sd is the sample standard deviation
    (None below two values)."""
    values = [r[split][name] for r in rows if finite(r[split].get(name))]
    undefined = sum(f"{split}.{name}" in r.get("undefined", {}) for r in rows)
    return {
        "mean": statistics.fmean(values) if values else None,
        "sd": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
        "of": len(rows),
        "undefined": undefined,
    }


def group_rows(rows: list[dict], by: list[str], metric: str) -> list[dict]:
    """Fold rows that differ only in the `by` keys into groups: {config: the other differing keys'
    values, n, experiments: ids, grouped_over, model, embedding, kept: {text: count}, test/val:
    {metric: stat()}} (pure).

    Best mean first among the groups where every point has the metric, then the incomplete ones (a
    mean over some of the points is not comparable), by mean.
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
        text = json.dumps({k: normal(v) for k, v in config.items()}, sort_keys=True, default=str)
        groups.setdefault(text, {"config": config, "rows": []})["rows"].append(r)
    out = [_aggregate(g["config"], g["rows"], by) for g in groups.values()]
    split, name = parse_metric(metric)
    sign = 1.0 if name in LOWER_IS_BETTER else -1.0

    def order(g: dict):
        s = g[split].get(name) or {"n": 0, "of": g["n"], "mean": None}
        return (s["n"] < s["of"], *_sort_key(s["mean"], sign, g["experiments"][0]))

    return sorted(out, key=order)


def metric_names(rows: list[dict], split: str, first: str | None = None) -> list[str]:
    """The metrics of `split` the rows have, in the order the training wrote them, `first` first."""
    names: dict[str, None] = {}
    for r in rows:
        names.update(dict.fromkeys(r[split]))
        names.update(dict.fromkeys(k.partition(".")[2] for k in r.get("undefined", {}) if k.startswith(split + ".")))
    ordered = list(names)
    return ([first] if first in names else []) + [m for m in ordered if m != first]


def _aggregate(config: dict, rows: list[dict], by: list[str]) -> dict:
    kept: dict[str, int] = {}
    for r in rows:
        text = kept_kind(r.get("kept"))
        kept[text] = kept.get(text, 0) + 1
    doc = {
        "config": config,
        "n": len(rows),
        "experiments": [r["experiment_id"] for r in rows],
        "grouped_over": {k: [r["plan"].get(k) for r in rows] for k in by},
        "model": rows[0]["model"],
        "embedding": rows[0]["embedding"],
        "kept": kept,
    }
    for split in SPLITS:
        doc[split] = {m: stat(rows, split, m) for m in metric_names(rows, split)}
    return doc


def render_table(headers: list[str], rows: list[list[Any]]) -> str:
    """Left-aligned text columns (the sweep's summary); floats with 4 decimals, None as '-', text
    cleaned of escape sequences."""
    from runner.lines import terminal_safe

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4f}"
        return terminal_safe(str(value))

    text = [headers, *[[cell(v) for v in row] for row in rows]]
    widths = [max(len(r[i]) for r in text) for i in range(len(headers))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in text)


def shown_value(value: Any) -> str:
    """A plan value as text: strings as they are, anything else as JSON (1e-05, true, null)."""
    return value if isinstance(value, str) else json.dumps(value)
