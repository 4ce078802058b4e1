"""What a run writes for TensorBoard, under `logs/tensorboard/version_N/` (docs/tracking.md).

Per validation, Lightning writes `val_loss` and `val_spearman` (the module's `self.log`) to every
logger; `ValidationScalars` adds each other metric of the plan as `val_<name>` at the same step, to
TensorBoard only, so the CSV log keeps the columns Lightning's monitors see (metrics/metrics.jsonl has
every metric of every epoch). At the end `write_final` adds a second file to the same run: the kept
model's validation metrics (`kept/val_<name>`), the test metrics (`test_<name>`), a text tag saying
what was kept, and the resolved plan as hyperparameters (`plan_hparams`) with those metrics, so the
HParams tab of `tensorboard --logdir <workdir>/experiments` compares a sweep's runs.

Each attempt of an experiment gets its own `version_N` (a resumed run continues the steps there);
nothing here is kept per process, so the experiments of a study slot never share a writer.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from runner.core.selection import SelectionRule
from runner.plan.models import Plan

log = logging.getLogger(__name__)

# where results are reported and what the run was given: neither changes what it computes (the
# experiment id, `infra compare` and MLflow's params leave them out too); tracking may hold a URL
LEFT_OUT = ("tracking", "resources")
# the second file of a run: the trainer closed the epochs' writer, and some tensorboardX versions name
# files by the second and the host only, so a writer without its own suffix within the same second
# would replace the epochs' file
FINAL_SUFFIX = ".kept"


class RunBoard(TensorBoardLogger):
    """Lightning's TensorBoardLogger at `logs_dir/tensorboard/version_N/` that remembers the step and
    names of the latest validation values it wrote (`val_loss` and what came with it), so the rest of
    that validation's metrics join them at the same step, whatever step Lightning chose."""

    def __init__(self, logs_dir: str | Path):
        # no `hp_metric` placeholder: the hyperparameters are written at the end, with the run's metrics
        super().__init__(str(logs_dir), name="tensorboard", default_hp_metric=False)
        self._validation: tuple[int | None, frozenset[str]] | None = None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics(metrics, step)
        if "val_loss" in metrics:
            self._validation = (step, frozenset(metrics))

    def log_validation(self, values: Mapping[str, Any] | None) -> None:
        """The plan's metrics of the latest validation (`{name: value}`, `Validation.metrics`) as
        `val_<name>` at its step, once; names written with it already (`val_spearman`) and undefined
        values are left out. Nothing when no validation was written since the last call."""
        if self._validation is None:
            return
        (step, written), self._validation = self._validation, None
        extra = {f"val_{k}": v for k, v in finite(values or {}).items() if f"val_{k}" not in written}
        if extra:
            super().log_metrics(extra, step)


class ValidationScalars(Callback):
    """Every validation metric of the plan to TensorBoard (`RunBoard.log_validation`), per epoch and for
    a fitted start scored before the first step (`SelectionRule.start`, logged at step 0). Goes after
    the selection rule in the callback list: its start is scored in the same hook."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rule = SelectionRule.of(trainer)
        if rule is not None and rule.start is not None:  # written only if the rule logged it just now
            _log_validation(trainer, rule.start.get("val"))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        result = getattr(pl_module, "last_validation", None)
        # always, so that no later call writes another validation's values at this one's step
        _log_validation(trainer, result.metrics if result is not None else None)


def _log_validation(trainer: L.Trainer, values: Mapping[str, Any] | None) -> None:
    for logger in trainer.loggers:
        if isinstance(logger, RunBoard):
            logger.log_validation(values)


def write_final(trainer: L.Trainer, plan: Plan, kept: Mapping[str, Any], text: str, test: Mapping[str, Any]) -> None:
    """The end of the run in each TensorBoard run of `trainer`, at its last step, in a second file:
    `kept/<name>` for the kept model's validation values (`kept`: `{"val_loss": …, "val_<metric>": …}`),
    `test_<metric>` for metrics.json's test metrics, `text` under the tag `kept`, and the plan's
    hyperparameters with those values as the HParams plugin's metrics. Undefined values are left out."""
    metrics = {f"kept/{k}": v for k, v in finite(kept).items()}
    metrics.update({f"test_{k}": v for k, v in finite(test).items()})
    params = plan_hparams(plan)
    for logger in trainer.loggers:
        if not isinstance(logger, TensorBoardLogger):
            continue
        board = TensorBoardLogger(
            logger.save_dir,
            name=logger.name,
            version=logger.version,
            default_hp_metric=False,
            filename_suffix=FINAL_SUFFIX,
        )
        try:
            # the metrics as scalars at `step` and, with the plan, as the HParams plugin's session
            board.log_hyperparams(params, metrics, step=trainer.global_step)
            if not metrics:  # the plugin needs a metric; a run without any defined one has no row there
                log.info("TensorBoard: no defined test or validation metric, so no HParams row")
            board.experiment.add_text("kept", text, global_step=trainer.global_step)
        finally:
            board.finalize("success")


def plan_hparams(plan: Plan) -> dict[str, str | int | float]:
    """The resolved plan as TensorBoard hyperparameters: dotted keys (`train.lr`), lists and objects as
    JSON text, nulls left out (TensorBoard has no null; `infra compare` counts null as missing too),
    `tracking` and `resources` left out."""
    doc = {k: v for k, v in plan.model_dump(mode="json").items() if k not in LEFT_OUT}
    return flatten(doc)


def flatten(doc: Mapping[str, Any], prefix: str = "") -> dict[str, str | int | float]:
    """`{"train": {"lr": 0.001}}` → `{"train.lr": 0.001}`; a boolean, an empty object, a list or any
    other value that is neither text nor a number becomes JSON text (`true`, `{}`, `[1, 2]`) (pure)."""
    out: dict[str, str | int | float] = {}
    for key, value in doc.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        elif value is None:
            continue
        elif isinstance(value, str | int | float) and not isinstance(value, bool):
            out[name] = value
        else:  # a boolean too: torch's writer would make it the number 0 or 1, tensorboardX's a boolean
            out[name] = json.dumps(value, sort_keys=True, default=str)
    return out


def finite(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of `values` as floats (None, NaN, booleans and text are left out)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[str(key)] = float(value)
    return out
