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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from runner.core.embeddings import create_embedding, output_length
from runner.core.metrics import spearman
from runner.core.models import create_model
from runner.core.registry import ParamError
from runner.core.selection import SelectionRule
from runner.core.tb import RunBoard, ValidationScalars
from runner.core.vocab import get_vocab_processor
from runner.errors import InfraError

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
# the core makes every callback itself: on resume from a last.ckpt of an older core, the state of the
# callbacks SelectionRule replaced is read by SelectionRule.on_load_checkpoint, not lost
warnings.filterwarnings("ignore", message=r".*callbacks used to create the checkpoint need to be provided.*")


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


@dataclass
class Validation:
    """One pass over the validation rows: targets and scores on the training scale, and their metrics."""

    loss: float
    y: np.ndarray
    p: np.ndarray
    spearman: float | None  # regression only; NaN when undefined (constant predictions)
    metrics: dict | None  # the plan's metrics on the original scale (VariantModule.val_metrics_fn)

    def record(self) -> dict[str, Any]:
        """The pass as an epoch record's fields: val_loss, val_spearman (null when undefined), val."""
        record: dict[str, Any] = {"val_loss": self.loss}
        if self.spearman is not None:
            # an undefined Spearman is null, never a number standing in for it: the records, the
            # progress view and the plots show what was measured
            record["val_spearman"] = self.spearman if math.isfinite(self.spearman) else None
        if self.metrics is not None:
            record["val"] = self.metrics
        return record


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
        covariates: list[str] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        vocab = get_vocab_processor(vocab_name, **(vocab_params or {}))
        self.embed = create_embedding(embedding_name, vocab, embedding_params)
        if covariates:  # data.covariates: appended to the embedding's output (runner.core.covariates)
            from runner.core.covariates import CovariateEmbedding

            if model_name == "cnn":
                from runner.plan.load import CNN_WITH_COVARIATES

                raise ParamError(f"data.covariates: {CNN_WITH_COVARIATES}")
            self.embed = CovariateEmbedding(self.embed, list(covariates), embedding_name)
        # what the model sees per variant: the sequence's positions, or an embedding's own length
        # (1 for pooled pLM features)
        self.feature_len = output_length(self.embed, seq_len)
        self.model = create_model(model_name, self.feature_len, self.embed.dim, n_outputs, model_params)
        self.val_metrics_fn: Callable[[np.ndarray, np.ndarray], dict] | None = None
        # the epoch's record, shipped by EpochReporter at the epoch's end; SelectionRule adds `best`
        # and `start_z` to it
        self.epoch_record: dict[str, Any] = {}
        # the latest validation pass (SelectionRule reads it at on_validation_end)
        self.last_validation: Validation | None = None
        self._sums: dict[str, list[torch.Tensor]] = {}
        self._val_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def closed_form_only(self) -> bool:
        """The model is solved in closed form and has nothing for gradient descent to train (`ridge`)."""
        return hasattr(self.model, "fit_closed_form") and not any(p.requires_grad for p in self.parameters())

    def prepare_embedding(
        self,
        tokens: np.ndarray,
        templates: list[str],
        source: np.ndarray,
        device=None,
        covariates: np.ndarray | None = None,
        train: np.ndarray | None = None,
    ) -> None:
        """Give an embedding with a `prepare` hook (runner.core.embeddings) the whole data set, once,
        before training: the `plm` embedding computes or reads its features here, never per batch.
        With data.covariates, `covariates` are the rows' values (N × K) and `train` the training rows'
        positions, whose mean and standard deviation standardise them (runner.core.covariates)."""
        from runner.core.covariates import CovariateEmbedding

        if isinstance(self.embed, CovariateEmbedding):
            if covariates is None or train is None:
                raise ValueError("prepare_embedding: data.covariates need covariates= and train=")
            self.embed.fit_standardisation(np.asarray(covariates)[np.asarray(train, dtype=np.int64)])
        prepare = getattr(self.embed, "prepare", None)
        if callable(prepare):
            t0 = time.perf_counter()
            if isinstance(self.embed, CovariateEmbedding):
                prepare(tokens, templates, source, device=device, covariates=covariates)
            else:
                prepare(tokens, templates, source, device=device)
            log.info("embedding %s prepared in %.2fs", self.hparams.embedding_name, time.perf_counter() - t0)

    def _chunks(self, name: str):
        """A re-iterable source of embedded `(x, y)` chunks of split `name` (None when it is empty)."""
        dm = self.trainer.datamodule
        index = dm.index[name]
        if not len(index):
            return None
        width = max(self.feature_len * int(self.embed.dim), 1)
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
            from runner.core.shared import fit_context

            t0 = time.perf_counter()
            hp = self.hparams
            # what a fit depends on beyond the point's data and split (runner.core.shared)
            with fit_context(hp.embedding_name, hp.embedding_params, hp.vocab_name, hp.vocab_params, hp.seq_len):
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
        self.last_validation = self._finish_validation("val")
        if self.last_validation is None:
            return
        rho = self.last_validation.spearman
        if rho is not None and math.isfinite(rho):
            self.log("val_spearman", rho)
        self.epoch_record.update(self.last_validation.record())

    def validate(self, batches) -> Validation | None:
        """One pass over validation `batches` outside Lightning's loop (the start, before the first
        step): the loss, scores and metrics an epoch's validation gets, in eval mode, nothing logged."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                for tokens, y in batches:
                    out = self(tokens)
                    self._accumulate("start", self.loss(out, y), len(y))
                    self._val_outputs.append((y, self.scores(out)))
            return self._finish_validation("start")
        finally:
            self._val_outputs = []
            self._sums.pop("start", None)
            self.train(was_training)

    def _finish_validation(self, stage: str) -> Validation | None:
        loss = self._epoch_loss(stage)
        outputs, self._val_outputs = self._val_outputs, []
        if loss is None or not outputs:
            return None
        y = torch.cat([a for a, _ in outputs]).float().cpu().numpy()
        p = torch.cat([b for _, b in outputs]).float().cpu().numpy()
        # the metric users rank by (regression): selection counts an undefined one (NaN, e.g.
        # constant predictions) as the worst value (runner.core.selection)
        rho = spearman(y, p) if self.hparams.task != "classification" else None
        metrics = self.val_metrics_fn(y, p) if self.val_metrics_fn is not None else None
        return Validation(loss, y, p, rho, metrics)

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


def resolve_precision(precision: str, accelerator: str) -> str:
    """Plan precision → Lightning's: 'auto' is bf16-mixed on a CUDA device that supports it, else 32-true."""
    if precision == "auto":
        on_gpu = accelerator != "cpu" and torch.cuda.is_available()
        return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"
    return {"32": "32-true", "64": "64-true"}.get(precision, precision)


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
    early stopping, precision, devices. `SelectionRule.of(trainer)` is its selection rule.

    With `logs_dir`, the epoch metrics Lightning sees (train_loss, val_loss, val_spearman) also go to
    a CSVLogger (`logs_dir/csv/version_N/metrics.csv`) and a TensorBoard logger
    (`logs_dir/tensorboard/version_N/`), which also gets every other validation metric of the plan
    (`runner.core.tb`); each attempt of an experiment gets the next N, so a resumed run keeps the
    earlier attempt's files and continues its steps.
    """
    accelerator = train.accelerator
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    devices = train.devices
    # one device unless the plan asks for more: the data set is small enough to live on one GPU
    devices = 1 if devices == "auto" else int(devices)
    # ckpts/best.ckpt and early stopping: one rule (runner.core.selection), first in the list so its
    # start pass runs before the other callbacks' epoch-start hooks and is not timed as part of epoch 0
    selection = SelectionRule(
        ckpt_dir / "best.ckpt", task, has_val, train.early_stopping_patience, select_by=train.select_by
    )
    # last.ckpt from its own callback, every epoch: ModelCheckpoint's save_last refreshed it only when
    # best.ckpt changed, so a run whose final epoch was not its best resumed one epoch back
    latest = ModelCheckpoint(
        dirpath=str(ckpt_dir), filename="last", monitor=None, save_top_k=1, enable_version_counter=False
    )
    callbacks = [selection, latest, *callbacks]
    if logs_dir is not None:  # after the rule, which scores a fitted start in the same hook
        callbacks.append(ValidationScalars())
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
    """Lightning's CSV and TensorBoard loggers below `logs_dir`, where `tensorboard --logdir` finds them
    (the TensorBoard one is `runner.core.tb.RunBoard`: the CSV log keeps the columns above)."""
    from lightning.pytorch.loggers import CSVLogger

    return [CSVLogger(str(logs_dir), name="csv"), RunBoard(logs_dir)]


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
