"""Where an experiment's variants and split come from: the one seam between the data and the training.

`run_experiment` asks a `DataSource` for both. The default reads the database and splits anew
every time (what `infra-train` does). A long-lived process that runs many experiments one after
another (a study slot, DESIGN §9) subclasses it to hand out what several experiments share, e.g. the
same `VariantSet` for every point of a sweep over `train.*`: `run_experiment` never modifies what a
source returns.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runner.core.data import VariantSet, load_variants
from runner.core.splits import make_split
from runner.plan.models import Plan


class DataSource:
    """Loads fresh each time: `load_variants(plan.data, plan.vocab)` and `make_split(variants, plan.split)`.

    `db_path` overrides every plan's `data.db` (`infra-train --db`: the database at its mount point).
    """

    def __init__(self, db_path: str | Path | None = None):
        self.db_path = db_path

    def variants(self, plan: Plan) -> VariantSet:
        """The variants `plan.data` selects, encoded with `plan.vocab`."""
        return load_variants(plan.data, plan.vocab, db_path=self.db_path)

    def split(self, plan: Plan, variants: VariantSet) -> dict[str, np.ndarray]:
        """Row positions of `variants` per split name (train, val, test), by `plan.split`."""
        return make_split(variants, plan.split)
