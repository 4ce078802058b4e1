"""Stop a training whose numbers stop being numbers: NaN or infinite losses, metrics or predictions.

Without this a diverged run (a learning rate too high, an exploding plugin model) trains on NaN
to the last epoch and is recorded `succeeded` with null metrics. The check runs once per epoch on
the epoch record the core already builds (no extra host sync per step), and once on the final
predictions; either raises `TrainingDiverged`, which `infra-train` turns into exit code 1 and one
line naming what became non-finite, so the experiment is recorded `failed`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from lightning.pytorch.callbacks import Callback

from runner.errors import TrainingDiverged

ADVICE = "lower train.lr, set train.gradient_clip_val, or check the model and the targets"


def non_finite(record: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys of `record` (nested dicts as 'val.spearman') whose value is a NaN or infinite number.

    Correlation metrics are undefined (NaN) for a constant prediction and the core reports those as
    None, so only values that are numbers and not finite count here.
    """
    bad = []
    for key, value in record.items():
        if isinstance(value, dict):
            bad += non_finite(value, f"{prefix}{key}.")
        elif isinstance(value, float) and not math.isfinite(value):
            bad.append(f"{prefix}{key}")
    return bad


def check_epoch(record: dict[str, Any]) -> None:
    """Raise TrainingDiverged when an epoch record holds a NaN or infinite loss or metric."""
    bad = non_finite({k: v for k, v in record.items() if k not in ("epoch", "step", "seconds")})
    if bad:
        values = ", ".join(f"{k}={_lookup(record, k)}" for k in bad)
        raise TrainingDiverged(f"training diverged at epoch {record.get('epoch')}: {values}; {ADVICE}")


def check_predictions(pred: np.ndarray) -> None:
    """Raise TrainingDiverged when any final prediction is NaN or infinite."""
    bad = ~np.isfinite(pred)
    if bad.any():
        raise TrainingDiverged(
            f"training diverged: {int(bad.sum())} of {pred.size} predictions are NaN or infinite; {ADVICE}"
        )


def _lookup(record: dict, dotted: str) -> Any:
    value: Any = record
    for part in dotted.split("."):
        value = value[part]
    return value


class NonFiniteGuard(Callback):
    """Ends `trainer.fit` with TrainingDiverged after the first epoch whose record is not finite.

    Place it after the callback that completes `pl_module.epoch_record` (EpochReporter), so the
    record is on disk (metrics.jsonl, events.jsonl) before the run fails.
    """

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        check_epoch({"epoch": int(trainer.current_epoch), **pl_module.epoch_record})
