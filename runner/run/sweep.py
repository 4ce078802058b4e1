"""`infra run PLAN --sweep KEY=V1,V2 …`: a grid of experiments (a study: `runner.run.study`), or put on the queue.

Decisions (see docs/plugins.md, "Sweeps"):

- `--sweep KEY=V1,V2,…` lists the values of one key. The text after `=` is first tried as a JSON
  array (its elements are the values); otherwise it is split on every comma and each part is parsed
  as JSON, else kept as a string. A value containing a comma therefore needs the JSON array form:
  `--sweep 'data.dataset=["A,B","C"]'`; sweeping a list-valued key needs a list of lists:
  `--sweep 'metrics=[["spearman"],["spearman","ndcg"]]'`.
- Several `--sweep`s make the cartesian product, the first one varying slowest. Each point is the
  plan with `--set` applied first and then the point's values (so a swept key wins over a `--set`).
- Every point is validated before anything runs: a bad value fails the whole sweep with exit 2 and
  the offending point named.
- The points run as a study (`runner.run.study`: long-lived slots, several at once with
  `--parallel`), each the experiment it would be alone (same id, same idempotency: a point that
  already succeeded is reported, not rerun). A failed point does not stop the study; an environment
  error (no Docker, a failed image build) or Ctrl-C stops it, and the rest are reported `not run`.
- `--cv`, or `split.fold: "all"` in the plan, adds `split.fold=[0,…,k-1]` (`fold_sweep`).
- Exit code: 130 when interrupted, else the environment error's code, else 1 if any point failed,
  else 0.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runner.errors import PlanError, UsageError

log = logging.getLogger(__name__)

MAX_POINTS = 1000


def parse_sweep(item: str) -> tuple[str, list[Any]]:
    """One `--sweep KEY=V1,V2` → (key, values); see the module docstring for the value syntax."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or not raw.strip():
        raise UsageError(f"--sweep {item!r}: expected KEY=V1,V2,…, e.g. --sweep train.lr=1e-3,1e-4")
    values: list[Any] | None = None
    if raw.lstrip().startswith("["):
        try:
            parsed = json.loads(raw)
        except (json.JSONDecodeError, RecursionError):  # too deep to be a value list: taken as text
            parsed = None
        if isinstance(parsed, list):
            values = parsed
    if values is None:
        values = [_scalar(part) for part in raw.split(",")]
    if not values:
        raise UsageError(f"--sweep {key}: give at least one value")
    seen: list[str] = []
    for value in values:
        text = json.dumps(value, sort_keys=True)
        if text in seen:
            raise UsageError(f"--sweep {key}: value {text} is given twice")
        seen.append(text)
    return key, values


def _scalar(part: str) -> Any:
    try:
        return json.loads(part)
    except (json.JSONDecodeError, RecursionError):
        return part


def grid(items: list[str]) -> list[dict[str, Any]]:
    """The cartesian product of the `--sweep` items as `[{key: value, …}, …]` (first sweep slowest)."""
    sweeps = [parse_sweep(item) for item in items]
    keys = [k for k, _ in sweeps]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise UsageError(f"--sweep {dupes[0]} is given more than once; list all its values in one --sweep")
    size = 1
    for _, values in sweeps:
        size *= len(values)
    if size > MAX_POINTS:
        raise UsageError(f"--sweep makes {size} experiments (limit {MAX_POINTS}); sweep fewer values")
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(v for _, v in sweeps))]


POSITION_FOLDS = 5  # the folds of `modulo` / `contiguous` without split.n_folds (runner.core.splits)


def fold_sweep(loaded) -> str | None:
    """`split.fold=[0,…,k-1]` for a plan whose `split.fold` is "all" (or with `--cv`): one point per fold."""
    split = loaded.plan.split
    n_folds = split.n_folds or (POSITION_FOLDS if split.strategy in ("modulo", "contiguous") else None)
    if n_folds is None:
        raise UsageError(
            f"--cv / split.fold 'all': split strategy {split.strategy!r} has no folds without split.n_folds; "
            "set split.n_folds"
        )
    return f"split.fold={json.dumps(list(range(n_folds)))}"


def point_label(point: dict[str, Any]) -> str:
    """A short, readable name for a point from its swept values: `mlp-seed1-fold0` (its experiment id
    keeps the plan's name, so the point has the id it would have run alone)."""
    parts = []
    for key, value in point.items():
        if isinstance(value, dict):
            value = value.get("name", json.dumps(value, sort_keys=True)[:16])
        text = show(value)
        tail = key.rsplit(".", 1)[-1]
        parts.append(text if isinstance(value, str) else f"{tail}{text}")
    return "-".join(parts)


def show(value: Any) -> str:
    """A swept value as text: strings bare, everything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def label(point: dict[str, Any]) -> str:
    return " ".join(f"{k}={show(v)}" for k, v in point.items())


@dataclass
class PointResult:
    """The outcome of one grid point, as reported in the summary and `--json`."""

    index: int
    values: dict[str, Any]
    label: str = ""  # a short name from the swept values (`point_label`)
    experiment_id: str | None = None
    state: str = "not run"
    exit_code: int | None = None  # infra's exit code for this point (0, 1, 3, 130 …)
    reused: bool = False
    attached: bool = False  # another runner was running it; this one waited for its end
    exp_dir: str | None = None
    message: str | None = None
    test: dict = field(default_factory=dict)
    val: dict = field(default_factory=dict)
    n: dict = field(default_factory=dict)
    training_seconds: float | None = None
    kept: dict | None = None  # what best.ckpt kept (runner.run.records.kept_of)
    undefined: dict = field(default_factory=dict)  # metric → why it has no value

    def to_dict(self) -> dict:
        return asdict(self)


def load_points(source: str, text: str | None, overrides: list[str], points: list[dict], workdir: Path) -> list:
    """Validate every point's plan up front (the plan text is read and parsed once; each point's values
    are applied as parsed values, not re-parsed strings); a PlanError names the point."""
    from runner.plan.document import STDIN, parse_json, read_plan_text
    from runner.plan.load import load_plan_document

    if text is None:
        text, name, base_dir = read_plan_text(source)
    else:
        name, base_dir = ("<stdin>", Path.cwd()) if source == STDIN else (source, Path(source).resolve().parent)
    doc = parse_json(text, name)
    loaded = []
    for i, point in enumerate(points, 1):
        try:
            loaded.append(load_plan_document(doc, name, workdir, base_dir=base_dir, overrides=overrides, values=point))
        except PlanError as exc:
            raise PlanError(f"{exc.source} (sweep point {i}: {label(point)})", exc.issues) from None
    return loaded


def submit_sweep(loaded_plans: list, points: list[dict], workdir: Path, redis_url: str, queue: str) -> list[dict]:
    """Put every point on the RQ queue (`runner.queue.submit`: job id = experiment id, duplicates reported)."""
    from runner.queue.connection import connect
    from runner.queue.submit import submit

    conn = connect(redis_url)
    docs = []
    for i, (point, loaded) in enumerate(zip(points, loaded_plans, strict=True), 1):
        docs.append({"index": i, "values": point, **submit(conn, loaded.resolved, workdir, queue_name=queue)})
    return docs


def summary_table(results: list[PointResult], keys: list[str]) -> str:
    """The study's human summary: one row per point (its label, experiment, state, what was kept) and up
    to four test metrics, `undef` where a metric has no value (the reason is in `infra status ID`)."""
    from runner.run.compare import render_table
    from runner.run.records import kept_text

    names = sorted({m for r in results for m in r.test})
    names = (["spearman"] if "spearman" in names else []) + [m for m in names if m != "spearman"]
    names = names[:4]
    headers = ["#", "point", "experiment", "state", "kept", *[f"test.{m}" for m in names]]

    def metric(r: PointResult, name: str):
        value = r.test.get(name)
        return "undef" if value is None and f"test.{name}" in r.undefined else value

    rows = [
        [r.index, r.label or label(r.values), r.experiment_id, r.state + (" (reused)" if r.reused else ""),
         kept_text(r.kept) if r.kept else "-", *[metric(r, m) for m in names]]
        for r in results
    ]  # fmt: skip
    return render_table(headers, rows)
