"""`infra compare`'s table, its notes on stderr and its CSV: which columns, in what order, how wide
(pure functions).

Columns, left to right: the experiment (ungrouped), its state (only when a row is not `succeeded`),
the metrics (the sort metric first, then the same metric of the other split, then the other test
metrics, then the other val metrics), what each model kept, the plan keys that differ, and in
`--wide` the sizes and seconds. The human table fits `width` characters: the experiment, the state,
the sort metric, kept and every differing key always stay (they tell rows apart); the other
columns are added in that order while they fit, and the caller says which were left out. Text from
experiment directories is cleaned (no escape sequences) and cut; the CSV has every column, full
numbers and one header per value (`test.spearman.mean`, `….sd`, `….n`). The notes say what was
compared, what is the same in all, what was left out, and why a cell reads `undef` or `!`.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from typing import Any

from runner.errors import UsageError
from runner.lines import terminal_safe
from runner.run.compare import Comparison, metric_names, normal, parse_metric, same_in_all, shown_value
from runner.run.records import clean_text, kept_text
from runner.run.views import metric_text, short_datasets, short_paths

VALUE_WIDTH = 24  # characters of a plan value in the human table
GAP = 2


@dataclass
class Column:
    name: str
    cells: list[str]
    essential: bool = False
    wide_only: bool = False

    @property
    def width(self) -> int:
        return max([len(self.name), *(len(c) for c in self.cells)])


def cell_text(value: Any, limit: int = VALUE_WIDTH) -> str:
    """A plan value in a cell: strings as they are, anything else as JSON; cleaned and cut to `limit`."""
    text = value if isinstance(value, str) else json.dumps(value)
    text = terminal_safe(text.replace("\t", " ").replace("\n", " "))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def metric_order(rows: list[dict], metric: str) -> list[tuple[str, str, bool]]:
    """(split, name, optional-in-narrow-tables) of every metric column, in display order."""
    split, name = parse_metric(metric)
    other = "val" if split == "test" else "test"
    cols = [(split, name)]
    if name in metric_names(rows, other):
        cols.append((other, name))
    cols += [("test", m) for m in metric_names(rows, "test") if ("test", m) not in cols]
    vals = [("val", m) for m in metric_names(rows, "val") if ("val", m) not in cols]
    return [(s, m, True) for s, m in cols] + [(s, m, False) for s, m in vals]  # val extras: --wide only


def key_cells(key: str, values: list[Any]) -> list[str]:
    """One differing plan key's cells: `data.db` as the file name when the names tell the paths apart,
    `data.dataset` shortened like `infra ls` does; missing or empty values as '-'."""
    values = [normal(v) for v in values]
    if key == "data.db":
        short = short_paths([v for v in values if isinstance(v, str)])
        return ["-" if v is None else cell_text(short.get(v, v) if isinstance(v, str) else v) for v in values]
    if key == "data.dataset":
        short = short_datasets([v for v in values if isinstance(v, str)], VALUE_WIDTH)
        return ["-" if v is None else cell_text(short.get(v, v) if isinstance(v, str) else v) for v in values]
    return ["-" if v is None else cell_text(v) for v in values]


def row_columns(rows: list[dict], metric: str, keys: list[str]) -> list[Column]:
    """The human columns of ungrouped rows (every column there is; `fit` chooses)."""
    cols = [Column("experiment", [terminal_safe(r["experiment_id"]) for r in rows], essential=True)]
    if any(r["state"] != "succeeded" for r in rows):
        cols.append(Column("state", [str(r["state"]) for r in rows], essential=True))
    for i, (split, name, narrow) in enumerate(metric_order(rows, metric)):
        cells = [metric_text(r[split].get(name), f"{split}.{name}" in r["undefined"]) for r in rows]
        cols.append(Column(f"{split}.{name}", cells, essential=i == 0, wide_only=not narrow))
    cols.append(Column("kept", [kept_text(r.get("kept")) for r in rows], essential=True))
    cols += [Column(k, key_cells(k, [r["plan"].get(k) for r in rows]), essential=True) for k in keys]
    for name, get in (
        ("n_train", lambda r: r["n"].get("train")),
        ("n_test", lambda r: r["n"].get("test")),
        ("epochs", lambda r: r.get("epochs")),
        ("train_s", lambda r: r.get("training_seconds")),
    ):
        cols.append(Column(name, ["-" if get(r) is None else str(get(r)) for r in rows], wide_only=True))
    return cols


def stat_text(s: dict | None, of: int) -> str:
    """A group's metric: `0.7312 ± 0.0051 (5/5)`, `0.0029 (1/5) !` (k of n points have a value;
    flagged when some lack it), `undef (0/5) !`, `- (0/5) !`."""
    if not s or s.get("mean") is None:
        undefined = bool(s and s.get("undefined"))
        return f"{'undef' if undefined else '-'} (0/{of}) !"
    text = f"{s['mean']:.4f}" + (f" ± {s['sd']:.4f}" if s.get("sd") is not None else "")
    return f"{text} ({s['n']}/{s['of']})" + (" !" if s["n"] < s["of"] else "")


def kept_summary(kept: dict[str, int]) -> str:
    """A group's kept models: `start`, or `start 3, epoch 2` when they differ."""
    if len(kept) == 1:
        return next(iter(kept))
    return ", ".join(f"{k} {n}" for k, n in sorted(kept.items(), key=lambda kv: (-kv[1], kv[0])))


def group_columns(groups: list[dict], rows: list[dict], metric: str) -> list[Column]:
    """The human columns of grouped rows: metric cells (mean ± sd (k/n)), kept, the configuration keys."""
    cols = []
    for i, (split, name, narrow) in enumerate(metric_order(rows, metric)):
        cells = [stat_text(g[split].get(name), g["n"]) for g in groups]
        cols.append(Column(f"{split}.{name}", cells, essential=i == 0, wide_only=not narrow))
    cols.append(Column("kept", [kept_summary(g["kept"]) for g in groups], essential=True))
    keys = list(groups[0]["config"]) if groups else []
    cols += [Column(k, key_cells(k, [g["config"].get(k) for g in groups]), essential=True) for k in keys]
    return cols


def fit(cols: list[Column], width: int | None, chosen: list[str] | None = None) -> tuple[list[Column], list[str]]:
    """(the columns shown, the names left out): `chosen` exactly (the experiment column first when
    there is one), else everything for `width` None, else the essential columns and then the others
    in order while the table stays within `width` characters."""
    by_name = {c.name: c for c in cols}
    if chosen:
        unknown = [c for c in chosen if c not in by_name]
        if unknown:
            raise UsageError(f"--columns {unknown[0]}: no such column here; columns: {', '.join(by_name)}")
        names = (["experiment"] if "experiment" in by_name and "experiment" not in chosen else []) + chosen
        return [by_name[n] for n in dict.fromkeys(names)], [c.name for c in cols if c.name not in names]
    if width is None:
        return cols, []
    shown = {c.name for c in cols if c.essential}
    used = sum(c.width for c in cols if c.essential) + GAP * (len(shown) - 1)
    for c in cols:
        if c.essential or c.wide_only:
            continue
        if used + GAP + c.width <= width:
            shown.add(c.name)
            used += GAP + c.width
    return [c for c in cols if c.name in shown], [c.name for c in cols if c.name not in shown]


def render(cols: list[Column]) -> str:
    """Left-aligned columns two spaces apart, a header row first, no trailing spaces."""
    if not cols:
        return ""
    widths = [c.width for c in cols]
    lines = [[c.name for c in cols], *zip(*(c.cells for c in cols), strict=True)]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in lines)


# --- what is said on stderr ---------------------------------------------------------------------------


def _label(config: dict) -> str:
    return " ".join(f"{k}={clean_text(shown_value(v), 40)}" for k, v in config.items()) or "all"


def notes(result: Comparison, groups: list[dict] | None, metric: str, hidden: list[str]) -> tuple[list[str], list[str]]:
    """(lines before the table, lines after it) for stderr: what is compared and what is the same in
    all, what was left out and why, and why a cell says `undef` or is flagged `!`."""
    rows, before, after = result.rows, [], []
    what = f"{len(rows)} experiment{'s' if len(rows) != 1 else ''}" if rows else "no experiment to compare"
    if result.study is not None:
        what += f" of study {result.study['study_id']} ({len(result.study['points'])} points)"
    same = ", ".join(f"{k}={clean_text(shown_value(v), 60)}" for k, v in same_in_all(rows).items())
    before.append(f"{what}" + (f"; same in all: {same}" if same and len(rows) > 1 else ""))
    hidden = hidden if rows else []
    if result.left_out:
        counts = ", ".join(f"{n} {state}" for state, n in sorted(result.left_out.items()))
        before.append(f"left out: {counts} (--all shows them)")
    if result.not_run:
        before.append(f"not run yet: {len(result.not_run)} point(s) of the study ({', '.join(result.not_run[:3])})")
    if hidden:
        more = f" and {len(hidden) - 4} more" if len(hidden) > 4 else ""
        before.append(f"not shown: {', '.join(hidden[:4])}{more} (--wide shows every column, --columns NAME,… picks)")
    split, name = parse_metric(metric)
    key = f"{split}.{name}"
    reasons = _reasons(rows, key)
    if groups is None:
        n = sum(key in r["undefined"] for r in rows)
        if n:
            after.append(f"undef: {key} has no value in {n} experiment{'s' if n > 1 else ''} ({reasons})")
        return before, after
    by_id = {r["experiment_id"]: r for r in rows}
    for g in groups:
        s = g[split].get(name) or {"n": 0, "of": g["n"], "undefined": 0}
        if s["n"] < s["of"]:
            members = [by_id[i] for i in g["experiments"]]
            why = f"{s['undefined']} undefined: {_reasons(members, key)}" if s["undefined"] else "no result"
            if s["undefined"] and s["of"] - s["n"] > s["undefined"]:
                why += f"; {s['of'] - s['n'] - s['undefined']} without a result"
            after.append(f"! {_label(g['config'])}: {key} has a value in {s['n']} of {s['of']} points ({why})")
    return before, after


def _reasons(rows: list[dict], key: str) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        if key in r["undefined"]:
            counts[r["undefined"][key]] = counts.get(r["undefined"][key], 0) + 1
    return ", ".join(f"{reason} ×{n}" if len(counts) > 1 else reason for reason, n in counts.items())


# --- CSV ----------------------------------------------------------------------------------------------


def row_csv(rows: list[dict], metric: str, keys: list[str]) -> tuple[list[str], list[list[Any]]]:
    """Every column of the ungrouped rows: experiment, state, metrics, `undefined` (the metrics without
    a value, ';'-separated), kept, the differing keys (whole values), sizes, seconds."""
    metrics = [(s, m) for s, m, _ in metric_order(rows, metric)]
    headers = ["experiment", "state", *[f"{s}.{m}" for s, m in metrics], "undefined", "kept", *keys]
    headers += ["n_train", "n_val", "n_test", "epochs", "train_s"]
    body = [
        [
            r["experiment_id"],
            r["state"],
            *[r[s].get(m) for s, m in metrics],
            ";".join(sorted(r["undefined"])),
            None if r.get("kept") is None else kept_text(r["kept"]),
            *[r["plan"].get(k) for k in keys],
            r["n"].get("train"),
            r["n"].get("val"),
            r["n"].get("test"),
            r.get("epochs"),
            r.get("training_seconds"),
        ]
        for r in rows
    ]
    return headers, body


def group_csv(groups: list[dict], rows: list[dict], metric: str) -> tuple[list[str], list[list[Any]]]:
    """Every column of the groups: per metric `.mean`, `.sd`, `.n` (points with a value), then kept
    (`kind:count;…`), the configuration keys, `points` and the experiments (';'-separated)."""
    metrics = [(s, m) for s, m, _ in metric_order(rows, metric)]
    keys = list(groups[0]["config"]) if groups else []
    headers = [f"{s}.{m}.{part}" for s, m in metrics for part in ("mean", "sd", "n")]
    headers += ["kept", *keys, "points", "experiments"]
    body = []
    for g in groups:
        cells: list[Any] = []
        for s, m in metrics:
            st = g[s].get(m) or {}
            cells += [st.get("mean"), st.get("sd"), st.get("n", 0)]
        cells.append(";".join(f"{k}:{n}" for k, n in g["kept"].items()))
        cells += [g["config"].get(k) for k in keys]
        cells += [g["n"], ";".join(g["experiments"])]
        body.append(cells)
    return headers, body


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if not isinstance(value, str | int | float):
        value = json.dumps(value)
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
