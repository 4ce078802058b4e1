"""Which weights become `ckpts/best.ckpt` and when training stops: one rule, on Lightning's public callback API.

`SelectionRule` is the only place that decides. For regression with validation rows it follows the
validation Spearman (what users rank models by; the loss can keep falling while the ranking gets
worse, e.g. on GB1's mass of zero scores); for classification the validation loss; without
validation rows the training loss.

**The start is a candidate.** When the model's start is already a fit (`ProteinModel.fitted_start`:
`mlp`/`cnn` with their ridge base, `ge`, regression `linear`), the rule scores it on the validation
rows once, after `on_train_start`'s closed-form fit and before the first optimiser step, with the
module's own forward (`VariantModule.validate`; Lightning's sanity check cannot do this: its results
are discarded by design). That score is a candidate for best.ckpt and counts for early stopping like
an epoch's. A trained epoch replaces a fitted start only when it is clearly better
(`selection_score`). A random or constant start is no candidate (a classifier's uniform start beat
its trained epochs on validation loss while ranking nothing), nor is the single pass of a
closed-form-only model (`ridge`): that epoch is the same model.

**Early stopping** follows training progress, not selection: for regression it ends training once
neither the validation Spearman nor the validation loss has improved for `patience` validations (on
GB1 the Spearman dropped from 0.55 to 0.26 for a few mid-training epochs while the loss kept falling,
and stopping on the Spearman alone ended runs there), so an epoch not yet clearly above the start
does not end training.

What the rule decides is visible: each validated epoch's record gets `best` (it became best.ckpt)
and, against a scored start, `start_z`; the start's record is `SelectionRule.start`
(`metrics.json` "start"); its metrics go to the loggers at step 0; one line in logs/train.log.
Everything the rule knows is in its callback state, so a run resumed from last.ckpt still competes
with the start's scores (a tensor: `torch.load(weights_only=True)` still loads the checkpoint) and
never scores a second start. A last.ckpt written before this rule existed (its state was kept by
`StartValidation`, a `ModelCheckpoint` keyed by its monitor, and `PlateauStop` or `EarlyStopping`)
is read through `on_load_checkpoint`.
"""

from __future__ import annotations

import itertools
import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from runner.core.metrics import greater_is_better, record_value, spearman, spearman_gain_z

log = logging.getLogger(__name__)

# a trained epoch replaces a fitted start in ckpts/best.ckpt only when its validation Spearman is at
# least this many standard errors above the start's (selection_score): the one-standard-error rule of
# model selection, which prefers the simpler model (here: the closed-form fit) unless the other is
# better by more than the noise (Hastie, Tibshirani & Friedman, Elements of Statistical Learning,
# 2nd ed., section 7.10)
LEAVE_START_Z = 1.0
# ... and at least this much above it: nearly identical predictions make the paired standard error tiny,
# so a consistent but negligible change passes the z alone (BLAT `cnn`, one fold: +0.0004 on 500
# validation rows at z = 1.9, then -0.0001 on test). 0.001 is the resolution rankings are read at.
LEAVE_START_GAIN = 0.001
INELIGIBLE = -3.0  # below any Spearman: an epoch with this selection score never becomes best.ckpt
# Selecting by another metric (`train.select_by`) there is no standard error to test against (the paired
# z is Spearman's): a trained epoch replaces a fitted start only when it is better by at least this share
# of the start's value (and LEAVE_START_GAIN). On BLAT the validation loss of mlp's last epochs moved by
# 0.1% from one epoch to the next; a real gain is far larger (an avGFP-like set: 0.344 -> 0.087, -75%).
LEAVE_START_REL_GAIN = 0.01
START_Z_BOUND = 99.0  # start_z is clipped to ±this, so records stay finite

# what early stopping watches, by kind of run ("none": no validation rows)
STOP_MONITORS = {
    "regression": {"val_spearman": "max", "val_loss": "min"},
    "classification": {"val_loss": "min"},
    "none": {"train_loss": "min"},
}
# the state keys of the callbacks this rule replaced, read from an older last.ckpt
LEGACY_START_KEY = "StartValidation"
LEGACY_MONITORS = {"regression": "val_select", "classification": "val_loss", "none": "train_loss"}


def selection_score(y: np.ndarray, p: np.ndarray, start: np.ndarray | None) -> tuple[float, float | None]:
    """A validation pass's score for best.ckpt (higher is better) and its z against the start.

    The score is the validation Spearman of the scores `p` (NaN, e.g. constant predictions, counts
    as -1), except that against a fitted start's scores `start` on the same rows it must be at least
    LEAVE_START_Z standard errors of the paired difference and LEAVE_START_GAIN above the start's, or
    it is INELIGIBLE. The z is None when there is no start to compete with.

    Why: on 500 BLAT validation rows, epochs that beat the ridge start by 0.0001-0.0006 (noise) were
    kept and did worse on test; a clear gain (GB1 `ge`, +0.03) is many standard errors. The standard
    error is that of the difference on the same rows, so a small gain of a model that ranks
    consistently better still counts.
    """
    rho = _rank_score(y, p)
    if start is None or len(start) != len(p):
        return rho, None
    z = min(max(spearman_gain_z(y, p, start), -START_Z_BOUND), START_Z_BOUND)
    gain = rho - _rank_score(y, start)
    return (rho if z >= LEAVE_START_Z and gain >= LEAVE_START_GAIN else INELIGIBLE), z


def clearly_better(value: float | None, start: float | None, greater: bool) -> bool:
    """Whether `value` of a metric other than Spearman clearly beats the fitted start's `start`
    (LEAVE_START_REL_GAIN of its size, at least LEAVE_START_GAIN); an undefined value never does, and
    any defined value beats an undefined start."""
    if value is None or not math.isfinite(value):
        return False
    if start is None or not math.isfinite(start):
        return True
    gain = value - start if greater else start - value
    return gain >= max(LEAVE_START_REL_GAIN * abs(start), LEAVE_START_GAIN)


def selection_metric(kind: str, select_by: str) -> str:
    """What a run of this kind is selected by: `train.select_by`, except that a run without validation
    rows follows its training loss, and a classification run keeps the validation loss for the default
    (a class probability against 0/1 labels ties most rows: its Spearman says little)."""
    if kind == "none":
        return "train_loss"
    if kind == "classification" and select_by == "val_spearman":
        return "val_loss"
    return select_by


def metric_greater(by: str) -> bool:
    """Whether a higher value of selection metric `by` is better (losses: lower)."""
    if by in ("val_loss", "train_loss"):
        return False
    greater = greater_is_better(by[len("val_") :])
    if greater is None:  # the core checks the plan before training (experiment._prepare)
        raise ValueError(f"metric {by[len('val_') :]!r} does not say whether higher or lower is better")
    return greater


def _rank_score(y: np.ndarray, p: np.ndarray) -> float:
    rho = spearman(y, p)
    return rho if math.isfinite(rho) else -1.0


def as_logged(value: float) -> float:
    """`value` at float32 precision, the precision metrics are logged and were compared in before this
    rule (a restored best value of an older last.ckpt is float32): an epoch that repeats a value
    exactly (nothing learned) must not count as better by rounding."""
    return float(np.float32(value))


def start_is_candidate(module: L.LightningModule) -> bool:
    """Whether the module's untrained start (after its closed-form part) competes with the epochs."""
    model = getattr(module, "model", None)
    return bool(getattr(model, "fitted_start", False)) and not getattr(module, "closed_form_only", False)


class Plateau:
    """Counts validations in which none of `monitors` (name → "min"/"max") improved on its best."""

    def __init__(self, monitors: dict[str, str]):
        self.monitors = monitors
        self.best: dict[str, float] = {}
        self.stale = 0

    def update(self, values: dict[str, float | None]) -> int:
        """Take one pass's values (None: not measured); return how many passes in a row improved nothing."""
        improved = False
        for name, mode in self.monitors.items():
            value = values.get(name)
            if value is None:
                continue
            value = as_logged(value)
            best = self.best.get(name)
            if best is None or (value > best if mode == "max" else value < best):
                self.best[name] = value
                improved = True
        self.stale = 0 if improved else self.stale + 1
        return self.stale


class SelectionRule(Callback):
    """Keeps `best_path` at the best candidate (the fitted start or a trained epoch) and stops training
    on a plateau; see the module docstring for the rule. `patience` 0 disables early stopping."""

    def __init__(self, best_path: str | Path, task: str, has_val: bool, patience: int, select_by: str = "val_spearman"):
        self.best_path = Path(best_path)
        self.has_val = bool(has_val)
        self.patience = int(patience)
        self.kind = ("classification" if task == "classification" else "regression") if has_val else "none"
        self.by = selection_metric(self.kind, select_by)  # what best.ckpt follows (metrics.json `kept.by`)
        self.greater = metric_greater(self.by)
        # the paired-z rule against a fitted start exists for the validation Spearman only
        self.by_spearman = self.by == "val_spearman"
        monitors = dict(STOP_MONITORS[self.kind])
        monitors.setdefault(self.by, "max" if self.greater else "min")  # stopping never ignores the selection
        self.plateau = Plateau(monitors)
        self.start_done = False  # the fitted start had its one chance to be scored
        self.start: dict[str, Any] | None = None  # its record: val_loss, val_spearman, val
        self.start_scores: torch.Tensor | None = None  # its validation scores, which epochs must beat
        self.best_score: float | None = None  # of what best.ckpt holds, higher is better

    @classmethod
    def of(cls, trainer: L.Trainer) -> SelectionRule | None:
        """The rule among a trainer's callbacks."""
        return next((c for c in trainer.callbacks if isinstance(c, cls)), None)

    # --- the start ---------------------------------------------------------------------------------

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the first epoch's start comes after on_train_start (the closed-form fit) and before any step
        if self.start_done or trainer.global_step > 0 or not start_is_candidate(pl_module):
            return
        self.start_done = True
        if not self.has_val:
            return
        batches = _limited(trainer.datamodule.val_dataloader(), trainer.limit_val_batches)
        with trainer.precision_plugin.val_step_context():
            result = pl_module.validate(batches)
        if result is None:
            return
        self.start = result.record()
        self.start_scores = torch.from_numpy(np.asarray(result.p, dtype=np.float32))
        shown = {k: self.start.get(k) for k in ("val_loss", "val_spearman")}
        shown[self.by] = record_value(self.start, self.by)
        log.info(
            "start (before the first step): %s",
            "  ".join(f"{k} {'undefined' if v is None else format(v, '.4f')}" for k, v in shown.items()),
        )
        # in the CSV/TensorBoard logs at step 0, before the epochs' values
        logged = {k: as_logged(v) for k, v in shown.items() if k in ("val_loss", "val_spearman") and v is not None}
        for logger in trainer.loggers:
            logger.log_metrics({**logged, "epoch": trainer.current_epoch}, step=trainer.global_step)
            logger.save()
        self._consider(trainer, self._score(self.start))
        self._count(trainer, self.start)

    # --- trained epochs ----------------------------------------------------------------------------

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        result = pl_module.last_validation  # VariantModule's pass that just ended
        if trainer.sanity_checking or result is None:
            return
        record = pl_module.epoch_record
        if self.by_spearman:
            start = self.start_scores.numpy() if self.start_scores is not None else None
            score, z = selection_score(result.y, result.p, start)
            if z is not None:
                record["start_z"] = round(z, 3)
        else:
            score = self._score(record)
            if self.start is not None and not clearly_better(
                record_value(record, self.by), record_value(self.start, self.by), self.greater
            ):
                score = -math.inf
        # in the epoch's record (metrics.jsonl, the epoch event): what the progress view marks "best",
        # without second-guessing the rule on the host
        record["best"] = self._consider(trainer, score)
        self._count(trainer, record)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.has_val or trainer.sanity_checking:
            return
        pl_module.close_train_epoch()  # idempotent: the record's train_loss, before the reporter ships it
        loss = pl_module.epoch_record.get("train_loss")
        if loss is not None:
            self._consider(trainer, -loss)
            self._count(trainer, {"train_loss": loss})

    def _score(self, record: dict) -> float:
        """A record's value of the selection metric as a score, higher is better (undefined: the worst)."""
        value = record_value(record, self.by)
        if value is None:
            return -1.0 if self.by_spearman else -math.inf
        return value if self.greater else -value

    def _consider(self, trainer: L.Trainer, score: float) -> bool:
        """Save best.ckpt when `score` beats what it holds (the first candidate always does)."""
        score = as_logged(score) if math.isfinite(score) else -math.inf
        if self.best_score is not None and not score > self.best_score:
            return False
        self.best_score = score
        trainer.save_checkpoint(
            str(self.best_path), weights_only=False
        )  # atomic (AtomicCheckpointIO); all ranks call it
        return True

    def _count(self, trainer: L.Trainer, record: dict) -> None:
        values = {name: record_value(record, name) for name in self.plateau.monitors}
        if self.patience > 0 and self.plateau.update(values) >= self.patience:
            trainer.should_stop = True

    # --- resume ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "start_done": self.start_done,
            "start": self.start,
            "start_scores": self.start_scores,
            "best_score": self.best_score,
            "plateau_best": dict(self.plateau.best),
            "plateau_stale": self.plateau.stale,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.start_done = bool(state.get("start_done", True))
        self.start = state.get("start")
        scores = state.get("start_scores")
        self.start_scores = scores if isinstance(scores, torch.Tensor) else None
        best = state.get("best_score")
        self.best_score = None if best is None else float(best)
        self.plateau.best = {k: float(v) for k, v in (state.get("plateau_best") or {}).items()}
        self.plateau.stale = int(state.get("plateau_stale", 0))

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Lightning calls load_state_dict with this rule's own state right after; an older last.ckpt
        # has none, so its pieces are taken from the callbacks that kept them then
        states = checkpoint.get("callbacks") or {}
        if self.state_key not in states:
            self.load_state_dict(legacy_state(states, LEGACY_MONITORS[self.kind]))


def legacy_state(states: dict, monitor: str) -> dict[str, Any]:
    """The rule's state from the callback states of a last.ckpt written before it existed."""
    start = states.get(LEGACY_START_KEY) or {}
    state: dict[str, Any] = {
        "start_done": bool(start.get("done", True)),
        "start": start.get("record"),
        "start_scores": start.get("scores"),
    }
    for key, value in states.items():
        if str(key).startswith("ModelCheckpoint") and value.get("monitor") == monitor:
            best = value.get("best_model_score")
            if best is not None and math.isfinite(float(best)):
                # ModelCheckpoint kept a loss as it is (lower is better); this rule keeps its negative
                state["best_score"] = float(best) if monitor == "val_select" else -float(best)
        elif key == "PlateauStop":
            state["plateau_best"], state["plateau_stale"] = value.get("best", {}), value.get("stale", 0)
        elif str(key).startswith("EarlyStopping") and value.get("best_score") is not None:
            best = float(value["best_score"])
            state["plateau_best"] = {monitor: best} if math.isfinite(best) else {}
            state["plateau_stale"] = int(value.get("wait_count", 0))
    return state


def _limited(batches, limit: int | float):
    """The first batches of a loader, as many as the trainer's `limit_val_batches` lets validation see."""
    if isinstance(limit, float):
        return batches if limit >= 1.0 else itertools.islice(batches, int(len(batches) * limit))
    return itertools.islice(batches, limit)
