"""Split registry: assign every selected variant to train / val / test.

A split function is `fn(variants, spec) -> {"train": idx, "val": idx, "test": idx}` where `idx`
are row positions into the VariantSet arrays. The validation set is a seeded `val_fraction` of what is
not test, drawn in the test's regime: random rows next to a random test, whole held-out positions next
to a position-held-out test (`modulo`, `contiguous`, a position-wise fold column; `_by_test_positions`),
so that what validation selects (the kept model, ridge's alpha, the end of training) is what the test
measures (runner.core.regimes).

`spec` is the plan's `split` section. The built-ins below take it typed (`SplitSpec`); a function
registered with `register_split` (a plugin) gets it as a dict (`SplitSpec.model_dump()`: `strategy`,
`n_folds`, `fold`, `test_fraction`, `val_fraction`, `seed`, `column`, `max_train_mut_num`), the form
docs/plugins.md documents, so plugins written against it keep working.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from runner.core.registry import Registry
from runner.errors import DataError, PlanError, PlanIssue
from runner.plan.models import SplitSpec

log = logging.getLogger(__name__)
SPLITS: Registry[dict] = Registry("split")
SPLIT_NAMES = ("train", "val", "test")


def register_split(name: str, fn: Callable[..., dict] | None = None):
    """Register `fn(variants, spec) -> {"train", "val", "test"}` index arrays under `name`; also a decorator.

    `spec` is the plan's split section as a dict (see the module docstring).
    """
    return SPLITS.register(name, fn)


def _plan_error(key: str, message: str) -> PlanError:
    return PlanError("plan", [PlanIssue(f"split.{key}", message)])


def _rng(spec: SplitSpec) -> np.random.Generator:
    return np.random.default_rng(spec.seed)


def _carve_val(
    rest: np.ndarray, spec: SplitSpec, rng: np.random.Generator, n_total: int
) -> tuple[np.ndarray, np.ndarray]:
    # val_fraction is a fraction of all selected variants (the plan checks val + test < 1)
    rest = rng.permutation(rest)
    n_val = min(int(round(spec.val_fraction * n_total)), max(len(rest) - 1, 0))
    return np.sort(rest[n_val:]), np.sort(rest[:n_val])


def _by_test_mask(test_mask: np.ndarray, spec: SplitSpec) -> dict[str, np.ndarray]:
    rng = _rng(spec)
    train, val = _carve_val(np.flatnonzero(~test_mask), spec, rng, len(test_mask))
    return {"train": train, "val": val, "test": np.flatnonzero(test_mask)}


# A fold column is position-wise when every position's variants share one fold, and at least this many
# positions hold more than one variant: with k random folds all of them agree by chance with probability
# at most k**-10 (1e-7 for 5 folds), so the column's name is never what decides.
POSITIONWISE_MIN_SHARED = 10


def _position_keys(variants) -> np.ndarray:
    """Each row's first mutated position as one integer per (template, position); 0 for the wild type."""
    pos = np.asarray(variants.first_pos).astype(np.int64)
    source = getattr(variants, "source", None)
    if source is None:
        return pos
    return np.where(pos > 0, np.asarray(source, dtype=np.int64) * (int(pos.max()) + 1) + pos, 0)


def positionwise(variants, folds: np.ndarray) -> bool:
    """Whether fold numbers `folds` (one per row) split by position (see POSITIONWISE_MIN_SHARED)."""
    keys = _position_keys(variants)
    mutated = keys > 0
    if not mutated.any():
        return False
    positions, inverse, counts = np.unique(keys[mutated], return_inverse=True, return_counts=True)
    if int((counts > 1).sum()) < POSITIONWISE_MIN_SHARED:
        return False
    fold = np.asarray(folds)[mutated].astype(np.float64)
    low = np.full(len(positions), np.inf)
    high = np.full(len(positions), -np.inf)
    np.minimum.at(low, inverse, fold)
    np.maximum.at(high, inverse, fold)
    return bool((low == high).all())


def contiguous_folds(variants, folds: np.ndarray) -> bool:
    """Whether each fold of a position-wise column is one block of consecutive positions of each template
    (a multi-template set's folds start again at every template: that is no change of block)."""
    keys = _position_keys(variants)
    mutated = keys > 0
    _, first = np.unique(keys[mutated], return_index=True)
    fold = np.asarray(folds)[mutated][first]  # positions in (template, position) order, with their fold
    source = getattr(variants, "source", None)
    template = np.asarray(source)[mutated][first] if source is not None else np.zeros(len(fold), dtype=np.int64)
    within = template[1:] == template[:-1]
    changes = int(((fold[1:] != fold[:-1]) & within).sum())
    blocks = sum(len(np.unique(fold[template == t])) for t in np.unique(template))
    return changes == blocks - len(np.unique(template))


def _by_test_positions(test_mask: np.ndarray, spec: SplitSpec, variants, contiguous: bool) -> dict[str, np.ndarray]:
    """Test = `test_mask`; validation = whole positions of the training rows, about `val_fraction` of all
    rows: one run of consecutive positions when `contiguous` (the test is a block), else positions drawn
    at random. Wild-type rows always train."""
    rng = _rng(spec)
    keys = _position_keys(variants)
    rest = np.flatnonzero(~test_mask)
    n_val = min(int(round(spec.val_fraction * len(test_mask))), max(len(rest) - 1, 0))
    candidates = rest[keys[rest] > 0]
    if n_val == 0 or not len(candidates):
        return {"train": rest, "val": np.zeros(0, dtype=np.int64), "test": np.flatnonzero(test_mask)}
    positions, counts = np.unique(keys[candidates], return_counts=True)
    if contiguous:
        ends = np.concatenate([[0], np.cumsum(counts)])
        # for each first position, the end of the shortest run reaching n_val rows; start where one fits
        stop = np.searchsorted(ends, ends[:-1] + n_val)
        fits = np.flatnonzero(stop < len(ends))
        first = int(rng.choice(fits)) if len(fits) else 0
        chosen = positions[first : min(int(stop[first]), len(positions))]
    else:
        order = rng.permutation(len(positions))
        reach = int(np.searchsorted(np.cumsum(counts[order]), n_val)) + 1
        chosen = positions[order[:reach]]
    if len(chosen) == len(positions):  # at least one training position stays
        chosen = chosen[:-1]
    val_mask = np.isin(keys[rest], chosen) & (keys[rest] > 0)
    return {"train": rest[~val_mask], "val": rest[val_mask], "test": np.flatnonzero(test_mask)}


def _fold(spec: SplitSpec, default_folds: int | None = None) -> tuple[int, int] | None:
    if spec.fold == "all":
        raise _plan_error("fold", "'all' runs one experiment per fold: 'infra run' expands it into a study")
    n_folds = spec.n_folds or default_folds
    if n_folds is None:
        return None
    fold = spec.fold
    if fold >= n_folds:
        raise _plan_error("fold", f"fold {fold} is out of range for n_folds={n_folds}; use 0..{n_folds - 1}")
    return int(n_folds), fold


@register_split("random")
def random_split(variants, spec: SplitSpec) -> dict[str, np.ndarray]:
    """Seeded random split; with `n_folds`, the test set is fold `fold` of a seeded k-fold partition."""
    n = len(variants.ids)
    rng = _rng(spec)
    perm = rng.permutation(n)
    folds = _fold(spec)
    if folds:
        n_folds, fold = folds
        test = np.array_split(perm, n_folds)[fold]
    else:
        test = perm[: int(round(spec.test_fraction * n))]
    mask = np.zeros(n, dtype=bool)
    mask[test] = True
    return _by_test_mask(mask, spec)


@register_split("mut_num")
def mut_num_split(variants, spec: SplitSpec) -> dict[str, np.ndarray]:
    """Train/val on variants with at most `max_train_mut_num` mutations, test on those with more."""
    return _by_test_mask(np.asarray(variants.mut_num) > spec.max_train_mut_num, spec)


@register_split("modulo")
def modulo_split(variants, spec: SplitSpec) -> dict[str, np.ndarray]:
    """ProteinGym 'modulo' folds: test = variants whose first mutated position % n_folds == fold (default 5 folds).

    Wild-type rows (no position) always train.
    """
    n_folds, fold = _fold(spec, default_folds=5)
    pos = np.asarray(variants.first_pos)
    return _by_test_positions((pos > 0) & ((pos - 1) % n_folds == fold), spec, variants, contiguous=False)


@register_split("contiguous")
def contiguous_split(variants, spec: SplitSpec) -> dict[str, np.ndarray]:
    """ProteinGym 'contiguous' folds: the mutated span cut into n_folds equal position blocks (default 5)."""
    n_folds, fold = _fold(spec, default_folds=5)
    pos = np.asarray(variants.first_pos)
    mutated = pos > 0
    if not mutated.any():
        return _by_test_mask(np.zeros(len(pos), dtype=bool), spec)
    lo, hi = int(pos[mutated].min()), int(pos[mutated].max())
    block = np.minimum(((pos - lo) * n_folds) // max(hi - lo + 1, 1), n_folds - 1)
    return _by_test_positions(mutated & (block == fold), spec, variants, contiguous=True)


_NAMED = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@register_split("column")
def column_split(variants, spec: SplitSpec) -> dict[str, np.ndarray]:
    """A predefined split column: values train/val/test (rows with other values are left out), or fold integers
    (test = rows whose value equals `fold`; val a `val_fraction` of the rest: whole held-out positions when
    the folds are position-wise (`positionwise`, measured on the rows), else random rows)."""
    column = spec.column
    if not column:
        raise _plan_error("column", "strategy 'column' needs split.column (a column of the mutations table)")
    frame = variants.frame
    if column not in frame.columns:
        raise DataError(
            f"split column {column!r} is not in the selected data; columns: {', '.join(map(str, frame.columns))}"
        )
    values = frame[column]
    if values.dtype.kind in "iuf":
        if values.isna().any():
            raise DataError(f"split column {column!r} has {int(values.isna().sum())} empty values; fill or filter them")
        if spec.fold == "all":
            raise _plan_error("fold", "'all' runs one experiment per fold: 'infra run' expands it into a study")
        folds = values.to_numpy()
        if positionwise(variants, folds):
            contiguous = contiguous_folds(variants, folds)
            log.info(
                "split column %r holds position-wise folds (%s): validation is held-out training positions",
                column,
                "blocks of consecutive positions" if contiguous else "scattered positions",
            )
            return _by_test_positions(folds == spec.fold, spec, variants, contiguous)
        return _by_test_mask(folds == spec.fold, spec)
    names = values.astype("string").str.strip().str.lower().map(_NAMED)
    out = {name: np.flatnonzero((names == name).fillna(False).to_numpy()) for name in SPLIT_NAMES}
    if not len(out["val"]):
        out["train"], out["val"] = _carve_val(out["train"], spec, _rng(spec), len(frame))
    return out


# the built-ins take the typed section; any other registered function its dict form (module docstring)
TYPED_SPLITS = frozenset({random_split, mut_num_split, modulo_split, contiguous_split, column_split})


def make_split(variants, spec: SplitSpec) -> dict[str, np.ndarray]:
    """Run the plan's split strategy and check the result (non-empty train and test, disjoint)."""
    name = spec.strategy
    fn = SPLITS.get(name)
    result = fn(variants, spec if fn in TYPED_SPLITS else spec.model_dump())
    out = {key: np.sort(np.asarray(result.get(key, []), dtype=np.int64)) for key in SPLIT_NAMES}
    for key in ("train", "test"):
        if len(out[key]) == 0:
            raise DataError(
                f"split strategy {name!r} left the {key} set empty ({len(variants.ids)} variants selected); "
                "change split.* or select more data"
            )
    total = sum(len(v) for v in out.values())
    if len(np.unique(np.concatenate(list(out.values())))) != total:
        raise DataError(f"split strategy {name!r} put a variant into more than one of train/val/test")
    return out


def write_split(directory: Path, variants, split: dict[str, np.ndarray], spec: SplitSpec, atomic_write) -> None:
    """Write splits/<name>.npy (row ids) and splits/split.json (strategy, sizes) via `atomic_write(path, bytes)`."""
    import io

    directory = Path(directory)
    for key in SPLIT_NAMES:
        buf = io.BytesIO()
        np.save(buf, np.asarray(variants.ids)[split[key]].astype(np.int64))
        atomic_write(directory / f"{key}.npy", buf.getvalue())
    info = {
        "spec": spec.model_dump(mode="json"),
        "sizes": {key: int(len(split[key])) for key in SPLIT_NAMES},
        "ids": "splits/<name>.npy (mutations.id)",
    }
    atomic_write(directory / "split.json", (json.dumps(info, indent=2) + "\n").encode())
