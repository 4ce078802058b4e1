"""One training run from a typed plan to the complete experiment directory (DESIGN §6).

`run_experiment` is what `infra-train` calls: plugins → variants → split → Lightning training →
predictions, metrics, artifacts and plots, written through `runner.core.layout.Layout`.

The plan stays a `runner.plan.models.Plan` throughout; it becomes JSON once, in config/plan.json.
A process may run many experiments one after another (a study slot): what they share comes from a
`DataSource`, and a run leaves no per-run state behind in the process (`_process_state`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from runner.core import kept, plots, regimes, tb
from runner.core.data import VariantSet
from runner.core.embeddings import EMBEDDINGS
from runner.core.guards import NonFiniteGuard, check_predictions, non_finite
from runner.core.layout import Layout, environment_info
from runner.core.metrics import METRICS, compute_metrics, greater_is_better, undefined_metrics
from runner.core.models import MODELS
from runner.core.outputs import epoch_history, write_artifacts, write_plots
from runner.core.plugins import load_plugins
from runner.core.predict import save_predict_state
from runner.core.selection import SelectionRule
from runner.core.sources import DataSource
from runner.core.splits import write_split
from runner.core.training import (
    Cancelled,
    EpochReporter,
    GracefulStop,
    VariantDataModule,
    VariantModule,
    build_trainer,
    fit,
    predict,
)
from runner.core.transforms import TargetTransform
from runner.errors import DataError, InfraError, PlanError, PlanIssue
from runner.plan.models import Plan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunContext:
    """The experiment in progress, for plugin code that needs it (`current_run()`)."""

    exp_dir: Path
    experiment_id: str
    stop: GracefulStop | None

    @property
    def stop_requested(self) -> bool:
        """Whether the run was asked to stop (SIGTERM, `infra stop`): a plugin's own long loop should end."""
        return self.stop is not None and self.stop.requested


_current: RunContext | None = None


def current_run() -> RunContext | None:
    """The run this process is doing now (None outside one). One process may run many experiments one
    after another (a study slot), so plugins ask here rather than reading `sys.argv` or the environment."""
    return _current


TRAIN_LOGGERS = ("runner", "lightning", "lightning.pytorch", "infra_ext")  # what logs/train.log receives
# set by Lightning for a run (deterministic algorithms, seed_everything), restored after it
RUN_ENVIRONMENT = ("CUBLAS_WORKSPACE_CONFIG", "PL_GLOBAL_SEED", "PL_SEED_WORKERS")


@contextlib.contextmanager
def _train_log(path: Path) -> Iterator[None]:
    """logs/train.log receives the run's log records at INFO and above; afterwards the loggers are as before."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    loggers = [logging.getLogger(name) for name in TRAIN_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)
        handler.close()


@contextlib.contextmanager
def _process_state() -> Iterator[None]:
    """Leave the process as the run found it: torch's determinism flags (Lightning sets them per run
    from `train.deterministic`), cuDNN's benchmark flag and the environment variables Lightning sets.
    Each run seeds its own random generators (`train.seed`), so those are not restored."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    environment = {name: os.environ.get(name) for name in RUN_ENVIRONMENT}
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark
        for name, value in environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_experiment(
    plan: Plan,
    exp_dir: str | Path,
    *,
    workdir: str | Path | None = None,
    stop: GracefulStop | None = None,
    limit_batches: int | None = None,
    data: DataSource | None = None,
    experiment_id: str | None = None,
) -> dict:
    """Run the typed `plan` into `exp_dir`; return metrics.json's document.

    Every default comes from `runner.plan.models`: the core reads the typed plan, never a default of
    its own. `workdir` holds the plugin folders (loading them again is a no-op); `stop` is a
    `training.GracefulStop` (SIGTERM handling); `limit_batches` caps batches per epoch (smoke tests);
    `data` gives the variants and split (default: `DataSource()`, read fresh from `plan.data.db`);
    `experiment_id` names the run in logs/events.jsonl (default: the folder's name).
    Raises DataError / PlanError for bad input, `training.Cancelled` after a graceful stop.
    """
    if not isinstance(plan, Plan):
        raise TypeError(f"run_experiment takes a runner.plan.models.Plan, not {type(plan).__name__}")
    global _current
    layout = Layout(exp_dir, experiment_id)
    _current = RunContext(layout.root, layout.experiment_id, stop)
    with _train_log(layout.path("logs/train.log")), _process_state():
        try:
            return _run(plan, layout, workdir, stop, limit_batches, data or DataSource())
        except InfraError as exc:
            log.error("%s", exc.message)  # logs/train.log says why, beside the container log
            raise
        finally:
            _current = None


def _run(plan: Plan, layout: Layout, workdir, stop, limit_batches, source: DataSource) -> dict:
    _prepare(plan, layout, workdir)
    variants, split = _load_data(plan, layout, source)
    targets = Targets.of(plan, variants, split)
    L.seed_everything(plan.train.seed, workers=True, verbose=False)
    module = _module(plan, variants, targets)
    # before the trainer: an embedding that computes its features once (plm) does it here, not per batch
    module.prepare_embedding(
        variants.tokens,
        variants.templates,
        variants.source,
        device=_embedding_device(plan),
        covariates=variants.covariates if plan.data.covariates else None,
        train=split["train"],
    )
    datamodule = VariantDataModule(variants.tokens, targets.train, split, plan.train.batch_size, seed=plan.train.seed)
    has_val = len(split["val"]) > 0
    trainer, epochs, seconds = _train(plan, layout, module, datamodule, targets.task, has_val, stop, limit_batches)
    selection = SelectionRule.of(trainer)
    selected, kept_epoch = _load_best(layout, module, selection)
    pred_all = targets.scores(predict(module, variants.tokens))
    check_predictions(pred_all)
    result = _result(plan, variants, split, targets, pred_all)
    history = epoch_history(layout, epochs)
    if selected != "start" and kept_epoch is None:  # no best.ckpt: the epoch the rule ranks first
        kept_epoch = kept.best_trained_epoch(history, selection)
    result.update(_selection(epochs, selected, kept_epoch, selection.start))
    start_name = getattr(module.model, "start_name", "fitted start")
    result["kept"] = kept.describe(
        selection,
        history,
        selected,
        result["best_epoch"],
        closed_form=module.closed_form_only,
        model_name=plan.model.name,
        start_name=start_name,
    )
    result.update(_speed(epochs, seconds), transform=targets.transform.state(), task=targets.task)
    layout.write_json("metrics/metrics.json", result)
    _report_kept(layout, trainer, plan, result, selection.start, history)
    write_artifacts(layout, module, variants, split, targets.raw, pred_all, targets.transform)
    save_predict_state(layout, plan, variants, targets.transform, targets.task)  # what `infra predict` needs
    try:
        with plots.closing_figures():
            write_plots(layout, history, variants, split, targets.raw, pred_all, result, plan.data.target, start_name)
    except Exception:  # a plot must never fail a finished training run
        log.exception("writing plots failed")
    if result["undefined"]:
        log.info("undefined: %s", ", ".join(f"{k} ({why})" for k, why in result["undefined"].items()))
    layout.event(
        "progress",
        phase="done",
        test=result["test"],
        undefined=result["undefined"],
        training_seconds=result["training_seconds"],
    )
    return result


def _report_kept(
    layout: Layout, trainer: L.Trainer, plan: Plan, result: dict, start: dict | None, history: list[dict]
) -> None:
    """Say what was kept wherever the run is read: train.log and stderr (one line, and the warning),
    a `{"phase": "kept"}` progress event, TensorBoard (the kept model's validation metrics at the last
    step, under `kept/`, a text tag, the test metrics and the plan as hparams: `tb.write_final`)."""
    doc = result["kept"]
    line = kept.summary(doc)
    log.info("%s", line)
    if doc["warning"]:
        log.warning("kept model: %s", doc["warning"])
    layout.event("progress", phase="kept", **doc)
    record = start if doc["model"] == "start" else next((r for r in history if r["epoch"] == doc["epoch"]), None)
    if doc["model"] == "closed_form" and history:
        record = history[-1]
    values = {"val_loss": (record or {}).get("val_loss"), "val_spearman": (record or {}).get("val_spearman")}
    values.update({f"val_{k}": v for k, v in ((record or {}).get("val") or {}).items()})
    tb.write_final(trainer, plan, values, line, result["test"])


def _prepare(plan: Plan, layout: Layout, workdir) -> None:
    """Record the plan and the environment, load the plugins, and refuse unknown component names and
    parameters before anything expensive happens."""
    if not layout.path("config/plan.json").exists():  # the host's copy, when it wrote one, is authoritative
        layout.write_json("config/plan.json", plan.model_dump(mode="json"))
    layout.write_json("config/environment.json", environment_info())
    if workdir is not None:
        load_plugins(workdir)
    for name in plan.metrics:
        METRICS.get(name)
    by = plan.train.select_by
    if by not in ("val_loss", "val_spearman") and greater_is_better(by[len("val_") :]) is None:
        raise PlanError(
            "plan",
            [
                PlanIssue(
                    "train.select_by",
                    f"metric {by[len('val_') :]!r} does not say whether higher or lower is better: set "
                    "greater_is_better = True or False on its function (docs/plugins.md), or select by another",
                )
            ],
        )
    MODELS.check_params(
        plan.model.name, dict(plan.model.params), "model.params", fixed=("seq_len", "in_dim", "n_outputs")
    )
    EMBEDDINGS.check_params(plan.embeddings.name, dict(plan.embeddings.params), "embeddings.params", fixed=("vocab",))
    if plan.embeddings.name == "plm":  # the model store is checked before the data is read
        from runner.core.plm import model_dir

        model_dir(plan.embeddings.params.get("model"))


def _embedding_device(plan: Plan) -> torch.device:
    """Where a prepared embedding (plm) computes: the GPU unless the plan trains on the CPU."""
    on_gpu = plan.train.accelerator != "cpu" and torch.cuda.is_available()
    return torch.device("cuda" if on_gpu else "cpu")


def _load_data(plan: Plan, layout: Layout, source: DataSource) -> tuple[VariantSet, dict[str, np.ndarray]]:
    """The variants and their split from `source`, recorded in config/query.json, data/ and splits/."""
    started = time.perf_counter()
    variants = source.variants(plan)
    layout.write_json("config/query.json", {**variants.query, "dropped": variants.dropped, "n_selected": len(variants)})
    buf = io.BytesIO()
    variants.frame.to_parquet(buf, index=False)
    layout.write_bytes("data/selected.parquet", buf.getvalue())
    log.info(
        "selected %d variants (dropped %s) in %.2fs", len(variants), variants.dropped, time.perf_counter() - started
    )
    split = source.split(plan, variants)
    write_split(layout.path("splits"), variants, split, plan.split, layout.write_bytes)
    sizes = {k: int(len(v)) for k, v in split.items()}
    layout.event("progress", phase="data", n_selected=len(variants), split=sizes, dropped=variants.dropped)
    _check_regimes(layout, variants, split)
    return variants, split


def _check_regimes(layout: Layout, variants: VariantSet, split: dict[str, np.ndarray]) -> None:
    """Log how many val/test variants sit at positions training never mutates; warn once when the two
    differ so much that validation selects for another problem (runner.core.regimes)."""
    shares = regimes.unseen_shares(variants, split)
    shown = {k: "none" if v is None else f"{v:.0%}" for k, v in shares.items()}
    log.info("variants at positions no training variant mutates: val %s, test %s", shown["val"], shown["test"])
    warning = regimes.regime_warning(shares)
    if warning:
        log.warning("%s", warning)
        layout.event("progress", phase="warning", warning="split_regime", message=warning, unseen_positions=shares)


@dataclass(frozen=True)
class Targets:
    """What the model learns (`train`) and how its outputs map back to the original scale (`raw`)."""

    task: str  # "regression" or "classification"
    raw: np.ndarray  # float64, data.target as stored: metrics are computed on it
    train: np.ndarray  # the loss's target: transformed floats, or class numbers
    transform: TargetTransform
    n_outputs: int

    @classmethod
    def of(cls, plan: Plan, variants: VariantSet, split: dict[str, np.ndarray]) -> Targets:
        raw = variants.target.astype(np.float64)
        if plan.data.target == "DMS_score_bin":
            labels = raw.astype(np.int64)
            if (labels < 0).any() or not np.array_equal(labels, raw):
                raise DataError("data.target: DMS_score_bin must hold class numbers 0, 1, …")
            return cls("classification", raw, labels, TargetTransform("none"), max(int(labels.max()) + 1, 2))
        transform = TargetTransform(plan.data.transform).fit(raw[split["train"]])
        return cls("regression", raw, transform.forward(raw).astype(np.float32), transform, 1)

    def scores(self, pred: np.ndarray) -> np.ndarray:
        """Model scores on the original scale (a classifier's are probabilities or classes already)."""
        return pred if self.task == "classification" else self.transform.inverse(pred)


def _module(plan: Plan, variants: VariantSet, targets: Targets) -> VariantModule:
    module = VariantModule(
        model_name=plan.model.name,
        model_params=dict(plan.model.params),
        embedding_name=plan.embeddings.name,
        embedding_params=dict(plan.embeddings.params),
        vocab_name=plan.vocab.name,
        vocab_params=dict(plan.vocab.params),
        seq_len=int(variants.tokens.shape[1]),
        task=targets.task,
        n_outputs=targets.n_outputs,
        lr=plan.train.lr,
        weight_decay=plan.train.weight_decay,
        optimizer=plan.train.optimizer,
        covariates=list(plan.data.covariates),
    )
    names, classification = list(plan.metrics), targets.task == "classification"
    module.val_metrics_fn = lambda y, p: compute_metrics(
        names, y if classification else targets.transform.inverse(y), targets.scores(p)
    )
    return module


def _train(plan: Plan, layout: Layout, module, datamodule, task: str, has_val: bool, stop, limit_batches):
    """Fit (resuming from ckpts/last.ckpt when an earlier attempt left one); return the trainer, the
    epoch records and the training time. Raises Cancelled after a graceful stop (last.ckpt saved)."""
    epochs: list[dict] = []
    callbacks = [EpochReporter(_epoch_sink(layout, epochs, plan.train.max_epochs)), NonFiniteGuard()]
    if stop is not None:
        callbacks.append(stop.callback())
    trainer = build_trainer(
        plan.train,
        layout.path("ckpts"),
        has_val=has_val,
        callbacks=callbacks,
        limit_batches=limit_batches,
        task=task,
        logs_dir=layout.path("logs"),
    )
    last = layout.path("ckpts/last.ckpt")
    resume = str(last) if last.exists() else None
    if resume:
        log.info("resuming from %s", last)
        layout.event("progress", phase="resume", checkpoint="ckpts/last.ckpt")
    layout.event("progress", phase="train", max_epochs=plan.train.max_epochs)
    started = time.perf_counter()
    fit(trainer, module, datamodule, resume, stop)
    seconds = time.perf_counter() - started
    if stop is not None and stop.requested:
        trainer.save_checkpoint(str(last))
        layout.event("progress", phase="cancelled", checkpoint="ckpts/last.ckpt", epoch=int(trainer.current_epoch))
        raise Cancelled("stopped by SIGTERM; ckpts/last.ckpt saved")
    return trainer, epochs, seconds


def _epoch_sink(layout: Layout, epochs: list[dict], max_epochs: int) -> Callable[[dict], None]:
    """Where each finished epoch's record goes: metrics.jsonl, the epoch event, one train.log line."""

    def on_epoch(record: dict) -> None:
        if non_finite(record):  # files stay strict JSON; NonFiniteGuard fails the run right after
            record = {**_nulls(record), "non_finite": non_finite(record)}
        epochs.append(record)
        layout.append_line("metrics/metrics.jsonl", record)
        layout.event("epoch", **record)
        log.info("%s", epoch_text(record, max_epochs))

    return on_epoch


def _load_best(layout: Layout, module: VariantModule, selection: SelectionRule) -> tuple[str, int | None]:
    """Load ckpts/best.ckpt into `module`; say whether it holds the fitted start or which epoch."""
    best = layout.path("ckpts/best.ckpt")
    if not best.exists():
        return "epoch", None
    checkpoint = torch.load(str(best), map_location=module.device, weights_only=False)
    module.load_state_dict(checkpoint["state_dict"])
    # saved at global step 0 after a start pass: no epoch was clearly above the untrained start
    # (the run's `kept:` line says so, runner.core.kept)
    if selection.start is not None and int(checkpoint.get("global_step", -1)) == 0:
        return "start", None
    return "epoch", checkpoint["epoch"] if isinstance(checkpoint.get("epoch"), int) else None


def _result(plan: Plan, variants: VariantSet, split, targets: Targets, pred_all) -> dict[str, Any]:
    """metrics.json's metrics (on the original scale) and counts."""
    names, y = list(plan.metrics), targets.raw
    result: dict[str, Any] = {}
    undefined: dict[str, str] = {}  # "test.spearman" -> why it is null (metrics.json `undefined`)
    for name in ("val", "test", "train"):
        idx = split[name]
        if not len(idx) and name != "train":
            result[name] = {}
            continue
        result[name] = compute_metrics(names, y[idx], pred_all[idx])
        reasons = undefined_metrics(names, y[idx], pred_all[idx], result[name])
        undefined.update({f"{name}.{metric}": why for metric, why in reasons.items()})
    sizes = {k: int(len(v)) for k, v in split.items()}
    result["n"] = {**sizes, "selected": len(variants), "dropped": dict(variants.dropped)}
    result["undefined"] = undefined
    return result


def _selection(epochs: list[dict], selected: str, kept_epoch: int | None, start: dict | None) -> dict[str, Any]:
    """metrics.json's account of what the model is: which epoch best.ckpt holds, or the fitted start."""
    # with a fitted start, not always the epoch of the highest val_spearman (runner.core.selection)
    best_epoch = None if selected == "start" else kept_epoch
    fields: dict[str, Any] = {"epochs": len(epochs), "best_epoch": best_epoch, "selected": selected}
    if start is not None:
        fields["start"] = _nulls(start)
    return fields


def _speed(epochs: list[dict], seconds: float) -> dict[str, Any]:
    samples = sum(int(r.get("samples", 0)) for r in epochs)
    return {
        "training_seconds": round(seconds, 3),
        "samples_per_second": round(samples / seconds, 1) if seconds > 0 else None,
    }


def epoch_text(record: dict, max_epochs: int) -> str:
    """One compact log line per epoch (1-based, as people count): the whole record is in logs/events.jsonl."""
    parts = [f"epoch {record['epoch'] + 1}/{max_epochs}"]
    for key in ("train_loss", "val_loss", "val_spearman"):
        value = record.get(key)
        if isinstance(value, int | float):
            parts.append(f"{key} {value:.4f}")
        elif key in record:  # measured and undefined (a Spearman of constant predictions): said, not hidden
            parts.append(f"{key} undefined")
    return "  ".join(parts)


def _nulls(record: dict) -> dict:
    """`record` with NaN/infinite numbers (also in nested dicts) replaced by None."""
    return {
        k: _nulls(v) if isinstance(v, dict) else None if isinstance(v, float) and not np.isfinite(v) else v
        for k, v in record.items()
    }
