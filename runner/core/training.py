"""Lightning training: the module around a `ProteinModel`, a token-matrix DataModule, the Trainer.

The data set stays a uint8 token matrix. On a GPU it is moved to the device once and batches are
index slices of device-resident tensors (no per-sample CPU DataLoader: measured 3–10× slower,
DESIGN §8); the embedding expands each batch on the device.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from runner.core.embeddings import create_embedding
from runner.core.metrics import spearman, spearman_gain_z
from runner.core.models import create_model
from runner.core.vocab import get_vocab_processor
from runner.errors import InfraError

# a trained epoch replaces a fitted start in ckpts/best.ckpt only when its validation Spearman is at
# least this many standard errors above the start's (VariantModule._selection_score): the one-standard-
# error rule of model selection, which prefers the simpler model (here: the closed-form fit) unless the
# other is better by more than the noise (Hastie, Tibshirani & Friedman, Elements of Statistical
# Learning, 2nd ed., section 7.10)
LEAVE_START_Z = 1.0
# ... and at least this much above it: nearly identical predictions make the paired standard error tiny,
# so a consistent but negligible change passes the z alone (BLAT `cnn`, one fold: +0.0004 on 500
# validation rows at z = 1.9, then -0.0001 on test). 0.001 is the resolution rankings are read at.
LEAVE_START_GAIN = 0.001
INELIGIBLE = -3.0  # below any Spearman: an epoch with this selection score never becomes best.ckpt

log = logging.getLogger(__name__)

# Lightning's advice for per-sample DataLoaders does not apply to pre-batched, device-resident data.
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
warnings.filterwarnings("ignore", message=r".*IterableDataset.*__len__.*")
warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated.*")
# a closed-form model (`ridge`) runs one pass with no optimizer and no gradient step, on purpose
warnings.filterwarnings("ignore", message=r".*configure_optimizers.*returned `None`.*")
warnings.filterwarnings("ignore", message=r".*training_step.*returned `None`.*")
# metrics are logged once per epoch, never per step: the step logging interval does not matter
warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")


class TokenBatches(torch.utils.data.IterableDataset):
    """Batches `(tokens[idx], target[idx])` by index slicing; reshuffled each epoch from `seed + epoch`."""

    def __init__(
        self,
        tokens: torch.Tensor,
        target: torch.Tensor,
        index: torch.Tensor,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epoch_fn: Callable[[], int] | None = None,
    ):
        self.tokens, self.target, self.index = tokens, target, index
        self.epoch_fn = epoch_fn  # the trainer's epoch, so a resumed run reshuffles exactly as before
        self.batch_size, self.shuffle, self.seed = int(batch_size), shuffle, int(seed)
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def _order(self) -> torch.Tensor:
        index = self.index
        if self.shuffle:
            epoch = self.epoch_fn() if self.epoch_fn is not None else self.epoch
            gen = torch.Generator().manual_seed(self.seed + epoch)
            index = index[torch.randperm(len(index), generator=gen).to(index.device)]
        return index[self.rank :: self.world_size] if self.world_size > 1 else index

    def __len__(self) -> int:
        return math.ceil(math.ceil(len(self.index) / self.world_size) / self.batch_size)

    def __iter__(self):
        order = self._order()
        self.epoch += 1
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            yield self.tokens[idx], self.target[idx]


class VariantDataModule(L.LightningDataModule):
    """Tokens, training targets and split indices; `setup` places them on the trainer's device."""

    def __init__(
        self,
        tokens: np.ndarray,
        target: np.ndarray,
        split: dict[str, np.ndarray],
        batch_size: int,
        seed: int = 0,
        eval_batch_size: int | None = None,
    ):
        super().__init__()
        self._tokens, self._target, self._split = tokens, target, split
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or max(batch_size, 4096))
        self.seed = int(seed)
        self.tokens: torch.Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.tokens is not None:
            return
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        self.rank = self.trainer.global_rank if self.trainer is not None else 0
        self.world_size = self.trainer.world_size if self.trainer is not None else 1
        self.tokens = torch.from_numpy(np.ascontiguousarray(self._tokens)).to(device)
        self.target = torch.from_numpy(np.ascontiguousarray(self._target)).to(device)
        self.index = {k: torch.from_numpy(np.asarray(v, dtype=np.int64)).to(device) for k, v in self._split.items()}
        self.index["all"] = torch.arange(len(self._tokens), device=device)
        epoch_fn = (lambda: self.trainer.current_epoch) if self.trainer is not None else None
        self._train = TokenBatches(
            self.tokens,
            self.target,
            self.index["train"],
            self.batch_size,
            True,
            self.seed,
            self.rank,
            self.world_size,
            epoch_fn,
        )

    def _loader(self, batches: TokenBatches) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(batches, batch_size=None, num_workers=0)

    def _eval(self, name: str) -> torch.utils.data.DataLoader:
        return self._loader(TokenBatches(self.tokens, self.target, self.index[name], self.eval_batch_size, False))

    def train_dataloader(self):
        return self._loader(self._train)

    def val_dataloader(self):
        return self._eval("val") if len(self.index["val"]) else []

    def test_dataloader(self):
        return self._eval("test")

    def predict_dataloader(self):
        return self._eval("all")


class VariantModule(L.LightningModule):
    """Embedding + `ProteinModel`; MSE (regression) or cross-entropy (classification) in one shared step."""

    def __init__(
        self,
        model_name: str,
        model_params: dict,
        embedding_name: str,
        embedding_params: dict,
        vocab_name: str,
        vocab_params: dict,
        seq_len: int,
        task: str = "regression",
        n_outputs: int = 1,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: str = "adamw",
    ):
        super().__init__()
        self.save_hyperparameters()
        vocab = get_vocab_processor(vocab_name, **(vocab_params or {}))
        self.embed = create_embedding(embedding_name, vocab, embedding_params)
        self.model = create_model(model_name, seq_len, self.embed.dim, n_outputs, model_params)
        self.val_metrics_fn: Callable[[np.ndarray, np.ndarray], dict] | None = None
        self.epoch_record: dict[str, Any] = {}
        self._sums: dict[str, list[torch.Tensor]] = {}
        self._val_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        # checkpoint selection against a fitted start (StartValidation, BestCheckpoint): the start's
        # validation scores, whether the current validation pass is the start's, and the last pass's
        # selection score (its val_spearman, or INELIGIBLE for an epoch not clearly above the start)
        self.start_val_scores: np.ndarray | None = None
        self.scoring_start = False
        self.select_score: float | None = None

    @property
    def closed_form_only(self) -> bool:
        """The model is solved in closed form and has nothing for gradient descent to train (`ridge`)."""
        return hasattr(self.model, "fit_closed_form") and not any(p.requires_grad for p in self.parameters())

    def _chunks(self, name: str):
        """A re-iterable source of embedded `(x, y)` chunks of split `name` (None when it is empty)."""
        dm = self.trainer.datamodule
        index = dm.index[name]
        if not len(index):
            return None
        width = max(int(self.hparams.seq_len) * int(self.embed.dim), 1)
        rows = max(64, min(8192, 2**22 // width))  # ~16 MB of float32 features per chunk

        def source():
            with torch.no_grad():
                for start in range(0, len(index), rows):
                    idx = index[start : start + rows]
                    yield self.embed(dm.tokens[idx]), dm.target[idx]

        return source

    def on_train_start(self) -> None:
        # the closed-form part of the fit, before any gradient step (deterministic, so a resumed run
        # recomputes exactly what it had)
        if hasattr(self.model, "fit_closed_form"):
            t0 = time.perf_counter()
            self.model.fit_closed_form(self._chunks("train"), self._chunks("val"))
            log.info("closed-form fit in %.2fs", time.perf_counter() - t0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(self.embed(tokens))

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.hparams.task == "classification":
            return F.cross_entropy(out.float(), y.long())
        return F.mse_loss(out.float(), y.float())

    def _accumulate(self, stage: str, loss: torch.Tensor, n: int) -> None:
        # device-side running sums: no host sync per step
        sums = self._sums.setdefault(stage, [torch.zeros((), device=loss.device), 0])
        sums[0] = sums[0] + loss.detach() * n
        sums[1] += n

    def _epoch_loss(self, stage: str) -> float | None:
        sums = self._sums.pop(stage, None)
        return float(sums[0]) / sums[1] if sums and sums[1] else None

    def _shared_step(self, batch, stage: str) -> torch.Tensor | None:
        tokens, y = batch
        if stage == "train" and self.closed_form_only:
            with torch.no_grad():  # nothing to step: record the training loss only
                self._accumulate(stage, self.loss(self(tokens), y), len(y))
            return None
        out = self(tokens)
        loss = self.loss(out, y)
        self._accumulate(stage, loss, len(y))
        if stage == "train":
            penalty = self.model.penalty() if hasattr(self.model, "penalty") else None
            if penalty is not None:
                loss = loss + penalty
        else:
            self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, batch_size=len(y))
            if stage == "val":
                self._val_outputs.append((y.detach(), self.scores(out.detach())))
        return loss

    def training_step(self, batch, batch_idx):
        return self._shared_step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self._shared_step(batch, "val")

    def test_step(self, batch, batch_idx):
        return self._shared_step(batch, "test")

    def predict_step(self, batch, batch_idx):
        return self.scores(self(batch[0]))

    def scores(self, out: torch.Tensor) -> torch.Tensor:
        """Model output → one score per variant: the value (regression), P(class 1) or the argmax class."""
        out = out.float()
        if self.hparams.task != "classification":
            return out
        return out.softmax(-1)[:, 1] if out.shape[-1] == 2 else out.argmax(-1).float()

    def close_train_epoch(self) -> None:
        """Turn the epoch's running sums into `train_loss` (logged for monitors) and the epoch record; idempotent."""
        if "train" not in self._sums:
            return
        samples = self._sums["train"][1]
        loss = self._epoch_loss("train")
        self.epoch_record["samples"] = int(samples)
        if loss is not None:
            self.log("train_loss", loss, prog_bar=False)
            self.epoch_record["train_loss"] = loss

    def on_train_epoch_end(self) -> None:
        self.close_train_epoch()
        if self.closed_form_only:
            self.trainer.should_stop = True  # solved exactly in on_train_start: one pass is all there is

    def on_validation_epoch_end(self) -> None:
        loss = self._epoch_loss("val")
        if loss is None:
            return
        self.epoch_record["val_loss"] = loss
        if not self.scoring_start:
            self.epoch_record["best"] = False  # BestCheckpoint sets it when this epoch becomes best.ckpt
        if self._val_outputs:
            y = torch.cat([a for a, _ in self._val_outputs]).float().cpu().numpy()
            p = torch.cat([b for _, b in self._val_outputs]).float().cpu().numpy()
            if self.hparams.task != "classification":
                # the metric users rank by: checkpoints and early stopping follow it (NaN, e.g. constant
                # predictions, counts as the worst value)
                rho = spearman(y, p)
                rho = -1.0 if not math.isfinite(rho) else rho
                self.log("val_spearman", rho)
                self.epoch_record["val_spearman"] = rho
                self.select_score = self._selection_score(rho, y, p)
            if self.val_metrics_fn is not None:
                self.epoch_record["val"] = self.val_metrics_fn(y, p)
        self._val_outputs = []

    def _selection_score(self, rho: float, y: np.ndarray, p: np.ndarray) -> float:
        """What ckpts/best.ckpt follows (`val_select`): the validation Spearman, except that a trained
        epoch competing with a fitted start must beat it by LEAVE_START_Z standard errors of the
        paired difference and by LEAVE_START_GAIN, or it is INELIGIBLE.

        Why: on 500 BLAT validation rows, epochs that beat the ridge start by 0.0001-0.0006 (noise)
        were kept and did worse on test; a clear gain (GB1 `ge`, +0.03) is many standard errors.
        The standard error is that of the difference on the same rows, so a small gain of a model
        that ranks consistently better still counts. The z is in the epoch's record (`start_z`).
        """
        if self.scoring_start:
            self.start_val_scores = p.copy()
            return rho
        if self.start_val_scores is None or len(self.start_val_scores) != len(p):
            return rho
        z = spearman_gain_z(y, p, self.start_val_scores)
        self.epoch_record["start_z"] = round(min(max(z, -99.0), 99.0), 3)
        start_rho = spearman(y, self.start_val_scores)
        gain = rho - (start_rho if math.isfinite(start_rho) else -1.0)
        return rho if z >= LEAVE_START_Z and gain >= LEAVE_START_GAIN else INELIGIBLE

    def configure_optimizers(self):
        hp = self.hparams
        if self.closed_form_only:
            return None
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay)
        else:
            cls = torch.optim.Adam if hp.optimizer == "adam" else torch.optim.AdamW
            optimizer = cls(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        # Cosine decay over max_epochs: late epochs take small steps, so predictions settle instead of
        # jittering — rank metrics on a bulk of near-equal scores (GB1's 29k zeros) depend on that.
        epochs = max(int(self.trainer.max_epochs or 1), 1)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file and renamed, so a kill never leaves a torn last.ckpt."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        tmp = f"{path}.tmp"
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)


class EpochReporter(Callback):
    """Hands each finished epoch's record (losses, val metrics, timing) to `sink(record)`."""

    def __init__(self, sink: Callable[[dict], None]):
        self.sink = sink
        self._t0 = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()
        pl_module.epoch_record = {}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        # callbacks run before the module's own hook: close the epoch here so the record is complete
        pl_module.close_train_epoch()
        record = {
            "epoch": int(trainer.current_epoch),
            "step": int(trainer.global_step),
            "seconds": round(time.perf_counter() - self._t0, 4),
            **pl_module.epoch_record,
        }
        self.sink(record)


def start_is_candidate(module: L.LightningModule) -> bool:
    """Whether the module's untrained start (after its closed-form part) competes with the epochs."""
    model = getattr(module, "model", None)
    return bool(getattr(model, "fitted_start", False)) and not getattr(module, "closed_form_only", False)


class StartValidation(Callback):
    """Scores the validation split once before the first optimiser step, as a candidate like any epoch.

    The pass runs Lightning's own validation loop at the start of the first epoch (after
    `on_train_start`, i.e. after a closed-form part such as `mlp`/`cnn`'s ridge base is solved), so
    `ModelCheckpoint`, `EarlyStopping` and `PlateauStop` see its metrics exactly as they see an epoch's:
    when no epoch is clearly above the start (see VariantModule._selection_score), ckpts/best.ckpt keeps the start's weights
    (for `mlp`/`cnn` with their zero-initialised last layer: the ridge fit). Lightning's sanity check
    cannot do this: its results are discarded by design. The start's record (`val_loss`,
    `val_spearman`, `val`) is kept in `record` and in the checkpoints' callback state, so a resumed
    run still knows it and never scores a second start. Closed-form-only models (`ridge`) skip the
    pass: their single epoch is the same model. So do models whose start is not a fit
    (`ProteinModel.fitted_start` False: `linear` with `init: "zero"`, `mlp`/`cnn` with `base: "none"`, plugins unless
    they set it): a random or constant start is no candidate (a classifier's uniform start beat its
    trained epochs on validation loss while ranking nothing).
    """

    def __init__(self):
        self.done = False
        self.record: dict[str, Any] | None = None
        # the start's validation scores, which trained epochs must beat clearly (VariantModule._selection_score);
        # a tensor, not an array, so checkpoints stay loadable with torch.load(weights_only=True)
        self.scores: torch.Tensor | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        # a resumed run: the trained epochs still compete with the start's validation scores
        if self.scores is not None and getattr(pl_module, "start_val_scores", None) is None:
            pl_module.start_val_scores = self.scores.numpy().copy()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.done or trainer.global_step > 0 or not start_is_candidate(pl_module):
            return
        self.done = True
        loop = trainer.fit_loop.epoch_loop.val_loop
        if not trainer.enable_validation:
            return
        pl_module.epoch_record = {}
        # what Lightning's training loop does around its own validation call
        first_loop_iter = trainer._logger_connector._first_loop_iter
        trainer.validating = True
        pl_module.scoring_start = True
        try:
            loop.run()
        finally:
            pl_module.scoring_start = False
        trainer.training = True
        trainer._logger_connector._first_loop_iter = first_loop_iter
        self.record = dict(pl_module.epoch_record) or None
        if getattr(pl_module, "start_val_scores", None) is not None:
            self.scores = torch.from_numpy(np.asarray(pl_module.start_val_scores, dtype=np.float32))
        pl_module.epoch_record = {}
        if self.record:
            shown = {k: v for k, v in self.record.items() if k in ("val_loss", "val_spearman")}
            log.info("start (before the first step): %s", "  ".join(f"{k} {v:.4f}" for k, v in shown.items()))

    def state_dict(self) -> dict:
        return {"done": self.done, "record": self.record, "scores": self.scores}

    def load_state_dict(self, state: dict) -> None:
        self.done, self.record = bool(state.get("done", True)), state.get("record")
        scores = state.get("scores")
        self.scores = scores if isinstance(scores, torch.Tensor) else None


class BestCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` that may also save at global step 0, i.e. the `StartValidation` pass.

    Lightning's skips a save when nothing stepped since its last one, and it counts "no save yet" as
    step 0, so the start could never become best.ckpt; -1 means "nothing saved yet" instead.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._last_global_step_saved = -1

    def _monitor_candidates(self, trainer) -> dict[str, torch.Tensor]:
        # `val_select` is the module's selection score (VariantModule._selection_score): not logged,
        # so the CSV/TensorBoard logs hold no sentinel values
        candidates = super()._monitor_candidates(trainer)
        score = getattr(trainer.lightning_module, "select_score", None)
        if score is not None:
            candidates["val_select"] = torch.tensor(float(score))
        return candidates

    def _update_best_and_save(self, current, trainer, monitor_candidates) -> None:
        super()._update_best_and_save(current, trainer, monitor_candidates)
        module = trainer.lightning_module
        if not getattr(module, "scoring_start", False):
            # in the epoch's record (metrics.jsonl, the epoch event): what the progress view marks
            # "best", without second-guessing the selection rule on the host
            module.epoch_record["best"] = True

    @property
    def state_key(self) -> str:
        # Lightning keys callback state by class name: keep ModelCheckpoint's, so a last.ckpt written
        # before this subclass existed still restores the best score on resume
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)


def resolve_precision(precision: str, accelerator: str) -> str:
    """Plan precision → Lightning's: 'auto' is bf16-mixed on a CUDA device that supports it, else 32-true."""
    if precision == "auto":
        on_gpu = accelerator != "cpu" and torch.cuda.is_available()
        return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"
    return {"32": "32-true", "64": "64-true"}.get(precision, precision)


class PlateauStop(Callback):
    """Early stopping once none of `monitors` (name → "min"/"max") has improved for `patience` epochs.

    Regression watches the validation Spearman *and* loss: on GB1 the Spearman dropped from 0.55 to
    0.26 for a few mid-training epochs while the loss kept falling, and stopping on the Spearman
    alone ended runs there; the checkpoint still keeps the best-Spearman epoch.
    """

    def __init__(self, monitors: dict[str, str], patience: int):
        self.monitors, self.patience = monitors, int(patience)
        self.best: dict[str, float] = {}
        self.stale = 0

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        improved = False
        for name, mode in self.monitors.items():
            value = trainer.callback_metrics.get(name)
            if value is None:
                continue
            value = float(value)
            best = self.best.get(name)
            if best is None or (value > best if mode == "max" else value < best):
                self.best[name] = value
                improved = True
        self.stale = 0 if improved else self.stale + 1
        if self.stale >= self.patience:
            trainer.should_stop = True

    def state_dict(self) -> dict:
        return {"best": dict(self.best), "stale": self.stale}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.stale = dict(state.get("best", {})), int(state.get("stale", 0))


def monitored(task: str, has_val: bool) -> tuple[str, str]:
    """The metric checkpoints and early stopping follow, and its mode.

    Regression: the validation Spearman (what users rank models by; the loss can keep falling while
    the ranking gets worse, e.g. on GB1's mass of zero scores), as `val_select`: with a fitted start,
    an epoch counts only when clearly above the start (VariantModule._selection_score).
    Classification: the validation loss.
    Without validation rows: the training loss.
    """
    if not has_val:
        return "train_loss", "min"
    return ("val_loss", "min") if task == "classification" else ("val_select", "max")


def build_trainer(
    train,
    ckpt_dir: Path,
    has_val: bool,
    callbacks: list[Callback],
    limit_batches: int | None = None,
    task: str = "regression",
    logs_dir: Path | None = None,
) -> L.Trainer:
    """A Trainer from the plan's typed `train` section (`runner.plan.models.TrainSpec`): checkpoints,
    early stopping, precision, devices.

    With `logs_dir`, the epoch metrics Lightning sees (train_loss, val_loss, val_spearman) also go to
    a CSVLogger (`logs_dir/csv/version_N/metrics.csv`) and a TensorBoardLogger
    (`logs_dir/tensorboard/version_N/`); each attempt of an experiment gets the next N, so a resumed
    run keeps the earlier attempt's files and continues its steps.
    """
    accelerator = train.accelerator
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    devices = train.devices
    # one device unless the plan asks for more: the data set is small enough to live on one GPU
    devices = 1 if devices == "auto" else int(devices)
    monitor, mode = monitored(task, has_val)
    # saved after each validation (Lightning's default with validation every epoch is the epoch's end,
    # which never sees the StartValidation pass); without validation rows, at the epoch's end
    checkpoint = BestCheckpoint(
        dirpath=str(ckpt_dir),
        filename="best",
        monitor=monitor,
        mode=mode,
        save_top_k=1,
        enable_version_counter=False,
        save_on_train_epoch_end=not has_val,
    )
    # last.ckpt from its own callback, every epoch: ModelCheckpoint's save_last refreshed it only when
    # best.ckpt changed, so a run whose final epoch was not its best resumed one epoch back
    latest = ModelCheckpoint(
        dirpath=str(ckpt_dir), filename="last", monitor=None, save_top_k=1, enable_version_counter=False
    )
    # first in the list (Lightning moves the checkpoint callbacks last): the start pass runs before the
    # other callbacks' epoch-start hooks, so it is not timed as part of epoch 0
    callbacks = [StartValidation(), checkpoint, latest, *callbacks]
    patience = train.early_stopping_patience
    if patience > 0:
        if monitor == "val_select":
            # training progress, not selection: an epoch not yet clearly above the start still counts
            callbacks.append(PlateauStop({"val_spearman": "max", "val_loss": "min"}, patience))
        else:
            # checked after each validation (not at the epoch's end, Lightning's default here), so the
            # StartValidation pass counts like an epoch
            callbacks.append(
                EarlyStopping(monitor=monitor, mode=mode, patience=patience, check_on_train_epoch_end=False)
            )
    kwargs: dict[str, Any] = {}
    if limit_batches:
        kwargs.update(limit_train_batches=limit_batches, limit_val_batches=limit_batches)
    if not has_val:
        kwargs["limit_val_batches"] = 0
    return L.Trainer(
        accelerator=accelerator,
        devices=devices,
        precision=resolve_precision(train.precision, accelerator),
        max_epochs=train.max_epochs,
        callbacks=callbacks,
        logger=standard_loggers(logs_dir) if logs_dir is not None else False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        gradient_clip_val=train.gradient_clip_val,
        deterministic=train.deterministic,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(ckpt_dir.parent),
        **kwargs,
    )


def standard_loggers(logs_dir: Path) -> list:
    """Lightning's CSV and TensorBoard loggers below `logs_dir`, where `tensorboard --logdir` finds them."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    return [
        CSVLogger(str(logs_dir), name="csv"),
        # no `hp_metric` placeholder: the hyperparameters are in hparams.yaml and config/plan.json
        TensorBoardLogger(str(logs_dir), name="tensorboard", default_hp_metric=False),
    ]


def predict(module: VariantModule, tokens: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    """Scores for every row of `tokens` with the module in eval mode on its current device."""
    module.eval()
    device = module.device
    out = []
    with torch.inference_mode():
        for start in range(0, len(tokens), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(tokens[start : start + batch_size])).to(device)
            out.append(module.scores(module(batch)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


EXIT_CANCELLED = 143  # 128 + SIGTERM: what a process killed by SIGTERM reports


class Cancelled(InfraError):
    """Training stopped on request (SIGTERM); last.ckpt holds the state to resume from (exit 143)."""

    exit_code = EXIT_CANCELLED


class GracefulStop:
    """First SIGTERM: finish the current step, save last.ckpt, exit 143. Second SIGTERM: exit at once.

    Outside `trainer.fit` (loading data, writing artifacts) the first SIGTERM raises `Cancelled`
    right away, since there is no training state worth saving.
    """

    def __init__(self):
        self.requested = False
        self.trainer: L.Trainer | None = None
        self._previous = None

    def install(self) -> GracefulStop:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            sys.stderr.write("second SIGTERM: exiting now\n")
            sys.stderr.flush()
            os._exit(EXIT_CANCELLED)
        self.requested = True
        if self.trainer is None:
            raise Cancelled("stopped by SIGTERM before training started")
        log.warning("SIGTERM: stopping after the current step; a second SIGTERM exits at once")
        self.trainer.should_stop = True

    def callback(self) -> Callback:
        stop = self

        class _StopCheck(Callback):
            # Lightning installs its own SIGTERM notifier during fit; this covers the case where it does not
            def on_train_batch_end(self, trainer, *args) -> None:
                if stop.requested:
                    trainer.should_stop = True

        return _StopCheck()


def fit(
    trainer: L.Trainer,
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    ckpt_path: str | None,
    stop: GracefulStop | None,
) -> None:
    """`trainer.fit`, treating Lightning's own SIGTERM exit as the graceful stop we asked for."""
    if stop is not None:
        stop.trainer = trainer
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        if stop is None:
            raise
        stop.requested = True
    finally:
        if stop is not None:
            stop.trainer = None
