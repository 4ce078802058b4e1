"""Ensembles for `infra predict`: which experiments are members, how their rows merge, how they rank.

Decisions (docs/cli.md, "Predicting"):

- Members are experiment ids given, or the succeeded points of a study (`--study`, narrowed by
  `--where`); a study's points may differ only in seed and fold keys (`SPREAD_KEYS`), else the
  ensemble would mix configurations: refused, naming the keys. Every member must have the same
  templates (`config/predict.json` sources), so that a row means the same variant to each.
- Each member predicts the whole input (no --top); rows align by position and each row's mutant
  text must be the same in every member. The merge streams: one row of each member at a time.
- A row's prediction is the mean of the members that predicted it, `std` their sample standard
  deviation (ddof 1; none below two, or beyond the float range), `n` how many (every prediction is
  finite: `read_result` refuses inf and nan); `measured` is true when any member says so;
  `in_train` counts the members that trained on it; `error` is the first member's when none predicted.
- `--rank mean` ranks by the mean; `--rank ucb:K` by mean + K·std (`ucb`), a row with n < 2 by its
  mean (it has no spread to add); a row whose std or ucb is beyond the float range is not ranked.
  `--top N` keeps the N best in a heap (memory: N rows), ties by input order; one model's too.
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from runner import safefs
from runner.errors import ExperimentFailed, UsageError
from runner.run.predict_io import Row, finite

SPREAD_KEYS = ("seed", "fold", "sample_seed")  # the last part of a plan key that an ensemble may vary


@dataclass(frozen=True)
class Rank:
    """How rows rank for --top: by the mean (`k` None) or by mean + k·std."""

    k: float | None = None

    @property
    def ucb(self) -> bool:
        return self.k is not None

    def __str__(self) -> str:
        return "mean" if self.k is None else f"ucb:{self.k:g}"


def parse_rank(text: str) -> Rank:
    """`mean` or `ucb:K` (K a finite number ≥ 0); UsageError else."""
    if text == "mean":
        return Rank()
    kind, _, k = text.partition(":")
    try:
        value = float(k)
    except ValueError:
        value = math.nan
    if kind != "ucb" or not (math.isfinite(value) and value >= 0):
        raise UsageError(f"--rank {text!r}: use 'mean' or 'ucb:K' with K a number >= 0, e.g. ucb:1.0")
    return Rank(value)


# --- members --------------------------------------------------------------------------------------


def is_spread_key(key: str) -> bool:
    return key.rpartition(".")[2] in SPREAD_KEYS


def study_members(workdir: Path, sid: str, where: list[str]) -> list[str]:
    """The succeeded points of study `sid` matching `where`, in the study's order; UsageError when
    there are none or when they differ in more than seed/fold keys."""
    from runner.run.compare import compare, differing_keys

    result = compare(workdir, [], where=where, study=sid)
    rows = result.rows
    if not rows:
        left = ", ".join(f"{n} {s}" for s, n in sorted(result.left_out.items())) or "none run yet"
        raise UsageError(
            f"study {sid} has no succeeded point to predict with{' matching --where' if where else ''} ({left})"
        )
    other = [k for k in differing_keys(rows) if not is_spread_key(k)]
    if other:
        raise UsageError(
            f"study {sid}'s points differ in {', '.join(other[:8])}, not only in seeds and folds: an ensemble "
            f"is one configuration; pick one with --where, e.g. --where {other[0]}=VALUE"
        )
    order = {p["experiment_id"]: p["index"] for p in result.study["points"] if p["experiment_id"]}
    return sorted((r["experiment_id"] for r in rows), key=lambda e: order.get(e, 0))


def templates_of(exp) -> list:
    """The sources (name, template) of an experiment's `config/predict.json` (checked for shape by
    `runner.run.predict.state_template_length` before: a list of objects with text names and templates)."""
    state = json.loads(safefs.read_bytes(exp.root, "config/predict.json"))
    return [(s.get("name"), s.get("template")) for s in state["sources"]]


def check_same_templates(exps: list) -> None:
    """Every member has the first member's templates; UsageError naming the first that differs."""
    first = templates_of(exps[0])
    for exp in exps[1:]:
        if templates_of(exp) != first:
            raise UsageError(
                f"experiment {exp.id} was trained on other templates than {exps[0].id} (config/predict.json "
                "sources): an ensemble's members must score the same sequences; leave it out"
            )


# --- the merge ------------------------------------------------------------------------------------


def merge(members: list[Iterator[Row]], ids: list[str], rank: Rank) -> Iterator[Row]:
    """One ensemble row per input row from each member's rows (streamed: one row of each at a time).

    Rows align by position; a member with more or fewer rows, or a row whose mutant text differs
    from the first member's, is ExperimentFailed: the results do not describe the same variants."""
    sentinel = object()
    index = 0
    iterators = [iter(m) for m in members]
    while True:
        got = [next(it, sentinel) for it in iterators]
        ended = [i for i, r in enumerate(got) if r is sentinel]
        if len(ended) == len(got):
            return
        index += 1
        if ended:
            raise ExperimentFailed(
                f"the members' results do not align: {ids[ended[0]]} has {index - 1:,} rows, others more; "
                "nothing was written"
            )
        first = got[0]
        for member, row in zip(ids[1:], got[1:], strict=True):
            if row.mutant != first.mutant:
                raise ExperimentFailed(
                    f"the members' results do not align: row {index:,} is {first.mutant[:40]!r} in {ids[0]} "
                    f"but {row.mutant[:40]!r} in {member}; nothing was written"
                )
        yield combine(got, rank)


def spread(values: list[float]) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation) of finite `values` ((None, None) for none; std None below
    two). Computed on the values scaled by a power of two (exact) so that no intermediate overflows
    (1e308 + 1e308, or (1e200 - -1e200)²); the mean of finite values is finite, a std beyond the
    float range (values near ±1.8e308 of both signs) is None: the row then has no spread to show."""
    n = len(values)
    if not n:
        return None, None
    scale = math.frexp(max(abs(v) for v in values))[1]
    scaled = [math.ldexp(v, -scale) for v in values]  # each in (-1, 1): sums and squares stay small
    mean = math.fsum(scaled) / n
    std = None
    if n > 1:
        deviation = math.sqrt(math.fsum((v - mean) ** 2 for v in scaled) / (n - 1))
        try:
            std = math.ldexp(deviation, scale)
        except OverflowError:
            std = None
    return math.ldexp(mean, scale), std


def combine(rows: list[Row], rank: Rank) -> Row:
    """The ensemble row of one variant's member rows (see the module's decisions)."""
    values = [r.prediction for r in rows if r.prediction is not None]
    n = len(values)
    mean, std = spread(values)
    ucb = None
    if rank.ucb and mean is not None and (std is not None or n < 2):
        ucb = mean + rank.k * std if std is not None else mean
        ucb = ucb if math.isfinite(ucb) else None  # beyond the float range: not ranked
    flags = [r.measured for r in rows if r.measured is not None]
    trained = [r.in_train for r in rows if r.in_train is not None]
    first = rows[0]
    return Row(
        mutant=first.mutant,
        inputs=first.inputs,
        sequence=next((r.sequence for r in rows if r.sequence), ""),
        prediction=mean,
        error="" if n else first.error,
        measured=any(flags) if flags else None,
        in_train=sum(bool(t) for t in trained) if trained else None,
        std=std,
        n=n,
        ucb=ucb,
    )


def rank_key(row: Row, rank: Rank) -> float | None:
    return row.ucb if rank.ucb else row.prediction


class TopN:
    """The N best rows by `rank` (rows without a finite value are counted, never kept); ties: the
    earlier row first. A heap of N rows: memory is bounded however many rows stream through."""

    def __init__(self, n: int, rank: Rank):
        self.n, self.rank = n, rank
        self.heap: list[tuple[float, int, Row]] = []  # the worst kept row on top: (key, -index, row)
        self.index = 0

    def add(self, row: Row) -> None:
        self.index += 1
        key = rank_key(row, self.rank)
        if not finite(key):
            return
        entry = (key, -self.index, row)
        if len(self.heap) < self.n:
            heapq.heappush(self.heap, entry)
        elif entry[:2] > self.heap[0][:2]:
            heapq.heapreplace(self.heap, entry)

    def result(self) -> list[Row]:
        return [e[2] for e in sorted(self.heap, key=lambda e: (-e[0], -e[1]))]


def top_rows(rows: Iterable[Row], n: int, rank: Rank) -> tuple[list[Row], int]:
    """(the N best rows, best first; how many rows came through)."""
    keep = TopN(n, rank)
    for row in rows:
        keep.add(row)
    return keep.result(), keep.index
