"""What the points of a study slot share: the selected variants, their splits, closed-form fits.

A slot (`runner.core.slot`) runs many experiments in one process. What does not depend on the
point is computed once and kept here, bounded (least recently used first out), so a slot's memory
does not grow with the number of points it ran:

- `SharedData.variants(plan)`: the rows a plan selects, keyed by the plan's data and vocab sections
  and the database file's identity (size, mtime, inode). Arrays are read-only: a point that tried
  to change them in place would fail, not corrupt the next point.
- `SharedData.split(plan, variants)`: the split indices, keyed by the variants and the split section.
- `cached_fit(key, compute)`: closed-form fits (ridge), keyed by the point's data and split, the
  embedding and the fit's own settings. Models started from a ridge fit (`mlp`, `cnn`, `ge`,
  `linear`) and `ridge` itself share one fit when only training keys (seed, lr, epochs) differ.

Everything cached is exactly what a fresh computation returns (the same deterministic code on the
same inputs), so a point's metrics are identical to the same point run alone. Outside a slot
(`infra-train`), nothing is cached.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

VARIANT_SETS = 2  # different selections kept (a study over two assays alternates between them)
SPLITS = 8
FITS = 8

_fit_scope: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("infra_fit_scope", default=None)


class Bounded(OrderedDict):
    """A dict that forgets its least recently used entries beyond `limit`."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def get_or(self, key, compute: Callable[[], Any]) -> tuple[Any, bool]:
        """(value, hit): the kept value, or a new one computed and kept."""
        if key in self:
            self.move_to_end(key)
            return self[key], True
        value = compute()
        self[key] = value
        while len(self) > self.limit:
            self.popitem(last=False)
        return value, False


def _canonical(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str)


def file_identity(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _read_only(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        value.setflags(write=False)
    return value


class SharedData:
    """The slot's caches (see the module docstring); one per slot process."""

    def __init__(self):
        self.variant_sets = Bounded(VARIANT_SETS)
        self.splits = Bounded(SPLITS)
        self.fits = Bounded(FITS)
        self.hits: dict[str, int] = {"variants": 0, "split": 0, "fit": 0}

    def data_key(self, plan, db_path: Path) -> str:
        data = plan.data.model_dump(mode="json")
        data.pop("db", None)  # the file's identity stands for it: the same file under another path is the same data
        return _canonical({"data": data, "vocab": plan.vocab.model_dump(mode="json"), "db": file_identity(db_path)})

    def variants(self, plan, db_path: Path, load: Callable[[], Any]):
        """The plan's VariantSet: kept from an earlier point or `load()`ed now (arrays made read-only)."""
        key = self.data_key(plan, db_path)

        def compute():
            variants = load()
            for name, value in vars(variants).items():
                if isinstance(value, np.ndarray):
                    _read_only(value)
                elif name == "frame":
                    for column in value.columns:  # pandas may hand out a view of the same memory
                        arr = value[column].to_numpy(copy=False)
                        if isinstance(arr, np.ndarray) and arr.flags.owndata:
                            arr.setflags(write=False)
            return variants

        value, hit = self.variant_sets.get_or(key, compute)
        self.hits["variants"] += hit
        return value

    def split(self, plan, db_path: Path, make: Callable[[], dict]):
        """The split indices of the plan's data: kept or made now (read-only)."""
        key = (self.data_key(plan, db_path), _canonical(plan.split.model_dump(mode="json")))

        def compute():
            return {name: _read_only(np.asarray(idx)) for name, idx in make().items()}

        value, hit = self.splits.get_or(key, compute)
        self.hits["split"] += hit
        return value

    @contextlib.contextmanager
    def point(self, plan, db_path: Path) -> Iterator[None]:
        """While a point runs: closed-form fits are shared with other points on the same data and split."""
        key = (self.data_key(plan, db_path), _canonical(plan.split.model_dump(mode="json")), self)
        token = _fit_scope.set(key)
        try:
            yield
        finally:
            _fit_scope.reset(token)


class SlotData:
    """A `runner.core.sources.DataSource` that lends a slot's shared variants and splits (see above),
    and shares closed-form fits while the point trains (`point`)."""

    def __init__(self, shared: SharedData, db_path: str | Path | None = None):
        from runner.core.sources import DataSource

        self.shared = shared
        self.fresh = DataSource(db_path=db_path)
        self.db_path = db_path

    def _db(self, plan) -> Path:
        return Path(self.db_path if self.db_path is not None else plan.data.db)

    def variants(self, plan):
        return self.shared.variants(plan, self._db(plan), lambda: self.fresh.variants(plan))

    def split(self, plan, variants):
        return self.shared.split(plan, self._db(plan), lambda: self.fresh.split(plan, variants))

    def point(self, plan):
        """While the point runs, its closed-form fits are shared (`SharedData.point`)."""
        return self.shared.point(plan, self._db(plan))


@contextlib.contextmanager
def fit_context(*parts: Any) -> Iterator[None]:
    """Narrow the current point's fit scope by what else a fit depends on (the embedding, the vocab)."""
    scope = _fit_scope.get()
    if scope is None:
        yield
        return
    token = _fit_scope.set((*scope, _canonical(parts)))
    try:
        yield
    finally:
        _fit_scope.reset(token)


def cached_fit(settings: Any, compute: Callable[[], Any]) -> Any:
    """A closed-form fit: computed, or (in a slot, for the same data, split, embedding and `settings`)
    the one an earlier point computed. Outside a slot it is always computed."""
    scope = _fit_scope.get()
    if scope is None:
        return compute()
    shared: SharedData = scope[2]
    key = (*scope[:2], *scope[3:], _canonical(settings))
    value, hit = shared.fits.get_or(key, compute)
    shared.hits["fit"] += hit
    if hit:
        log.info("closed-form fit reused from an earlier point of this slot")
    return value
