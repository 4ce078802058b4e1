"""One training run from a resolved plan to the complete experiment directory (DESIGN §6).

`run_experiment` is what `infra-train` calls: plugins → variants → split → Lightning training →
predictions, metrics, artifacts and plots. Every file is written atomically (`runner.safefs`: temp +
rename, no links followed); `logs/events.jsonl` only ever receives whole lines in one `write` call.
The host's records (status.json, events.jsonl, container.log at the top of the experiment) are not
visible here.
"""

from __future__ import annotations

import io
import json
import logging
import os
import platform
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from runner import safefs
from runner.errors import InfraError

log = logging.getLogger(__name__)

# The training's own events (progress, epochs); the host's state events are in <exp>/events.jsonl,
# which the container cannot see.
EVENTS_FILE = "logs/events.jsonl"
LAYOUT_DIRS = ("config", "data", "splits", "logs", "metrics", "ckpts", "artifacts/visualization")
CORE_VERSION = "0.1.0"


def core_version() -> str:
    try:
        from importlib.metadata import version

        return version("infra")
    except Exception:  # running from a source tree
        return CORE_VERSION


class Layout:
    """The experiment directory: atomic file writes and append-only JSON lines."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        for sub in LAYOUT_DIRS:
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.experiment_id = os.environ.get("INFRA_EXPERIMENT_ID") or self.root.name

    def path(self, rel: str | Path) -> Path:
        return self.root / rel

    def write_bytes(self, rel: str | Path, data: bytes) -> Path:
        rel = Path(rel)
        rel = rel.relative_to(self.root) if rel.is_absolute() else rel
        safefs.write_atomic(self.root, rel, data)
        return self.path(rel)

    def write_json(self, rel: str | Path, doc: Any) -> Path:
        return self.write_bytes(rel, (json.dumps(doc, indent=2, default=_json_default) + "\n").encode())

    def append_line(self, rel: str | Path, doc: dict) -> None:
        line = (json.dumps(doc, default=_json_default) + "\n").encode()
        fd = os.open(self.path(rel), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write: never interleaves with the host's own lines
        finally:
            os.close(fd)

    def event(self, kind: str, **fields: Any) -> None:
        ts = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        self.append_line(EVENTS_FILE, {"ts": ts, "event": kind, "experiment_id": self.experiment_id, **fields})


def _json_default(obj: Any):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def environment_info() -> dict:
    """Versions and hardware for config/environment.json."""
    import lightning
    import torch

    cuda = torch.cuda.is_available()
    return {
        "core": core_version(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "numpy": np.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "image_id": os.environ.get("INFRA_IMAGE_ID"),
    }


def _file_logging(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    for name in ("runner", "lightning", "lightning.pytorch", "infra_ext"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
    return handler


def _drop_file_logging(handler: logging.Handler) -> None:
    for name in ("runner", "lightning", "lightning.pytorch", "infra_ext"):
        logging.getLogger(name).removeHandler(handler)
    handler.close()


def run_experiment(
    plan,
    exp_dir: str | Path,
    db_path: str | Path | None = None,
    workdir: str | Path | None = None,
    stop=None,
    limit_batches: int | None = None,
) -> dict:
    """Run `plan` (a typed `Plan`; a dict is validated into one) into `exp_dir`; return metrics.json's document.

    Every default comes from `runner.plan.models`: the core reads the typed plan, never a default of
    its own.

    `db_path` overrides `data.db`; `workdir` holds the plugin folders; `stop` is a
    `training.GracefulStop` (SIGTERM handling); `limit_batches` caps batches per epoch (smoke tests).
    Raises DataError / PlanError for bad input, `training.Cancelled` after a graceful stop.
    """
    layout = Layout(exp_dir)
    handler = _file_logging(layout.path("logs/train.log"))
    try:
        return _run(_typed(plan), layout, db_path, workdir, stop, limit_batches)
    except InfraError as exc:
        log.error("%s", exc.message)  # logs/train.log says why, beside the container log
        raise
    finally:
        _drop_file_logging(handler)


def _typed(plan):
    from runner.plan.issues import plan_from_document
    from runner.plan.models import Plan

    return plan if isinstance(plan, Plan) else plan_from_document(dict(plan), "plan")


def _run(typed, layout: Layout, db_path, workdir, stop, limit_batches) -> dict:
    import lightning as L

    from runner.core import plots
    from runner.core.data import load_variants
    from runner.core.embeddings import EMBEDDINGS
    from runner.core.guards import NonFiniteGuard, check_predictions, non_finite
    from runner.core.metrics import METRICS, compute_metrics
    from runner.core.models import MODELS
    from runner.core.plugins import load_plugins
    from runner.core.predict import save_predict_state
    from runner.core.splits import make_split, write_split
    from runner.core.training import (
        Cancelled,
        EpochReporter,
        VariantDataModule,
        VariantModule,
        build_trainer,
        fit,
        predict,
    )
    from runner.core.transforms import TargetTransform

    plan = typed.model_dump(mode="json")  # the dict form the data and split functions take
    if not layout.path("config/plan.json").exists():
        layout.write_json("config/plan.json", plan)
    layout.write_json("config/environment.json", environment_info())
    if workdir is not None:
        load_plugins(workdir)
    for name in typed.metrics:
        METRICS.get(name)  # unknown metric: fail before the expensive part
    # so are unknown model / embedding names and parameters
    MODELS.check_params(
        typed.model.name, dict(typed.model.params), "model.params", fixed=("seq_len", "in_dim", "n_outputs")
    )
    EMBEDDINGS.check_params(typed.embeddings.name, dict(typed.embeddings.params), "embeddings.params", fixed=("vocab",))

    started = time.perf_counter()
    variants = load_variants(plan, db_path=db_path)
    layout.write_json("config/query.json", {**variants.query, "dropped": variants.dropped, "n_selected": len(variants)})
    buf = io.BytesIO()
    variants.frame.to_parquet(buf, index=False)
    layout.write_bytes("data/selected.parquet", buf.getvalue())
    log.info(
        "selected %d variants (dropped %s) in %.2fs", len(variants), variants.dropped, time.perf_counter() - started
    )

    split_spec = dict(plan["split"])
    split = make_split(variants, split_spec)
    write_split(layout.path("splits"), variants, split, split_spec, lambda p, b: layout.write_bytes(p, b))
    sizes = {k: int(len(v)) for k, v in split.items()}
    layout.event("progress", phase="data", n_selected=len(variants), split=sizes, dropped=variants.dropped)

    train = typed.train
    classification = typed.data.target == "DMS_score_bin"
    y_raw = variants.target.astype(np.float64)
    if classification:
        labels = y_raw.astype(np.int64)
        if (labels < 0).any() or not np.array_equal(labels, y_raw):
            raise _data_error("data.target: DMS_score_bin must hold class numbers 0, 1, …")
        n_outputs = max(int(labels.max()) + 1, 2)
        y_train_scale = labels
        transform = TargetTransform("none")
    else:
        transform = TargetTransform(typed.data.transform).fit(y_raw[split["train"]])
        y_train_scale = transform.forward(y_raw).astype(np.float32)
        n_outputs = 1

    L.seed_everything(train.seed, workers=True, verbose=False)
    metric_names = list(typed.metrics)

    def to_scores(pred: np.ndarray) -> np.ndarray:
        return pred if classification else transform.inverse(pred)

    module = VariantModule(
        model_name=typed.model.name,
        model_params=dict(typed.model.params),
        embedding_name=typed.embeddings.name,
        embedding_params=dict(typed.embeddings.params),
        vocab_name=typed.vocab.name,
        vocab_params=dict(typed.vocab.params),
        seq_len=int(variants.tokens.shape[1]),
        task="classification" if classification else "regression",
        n_outputs=n_outputs,
        lr=train.lr,
        weight_decay=train.weight_decay,
        optimizer=train.optimizer,
    )
    module.val_metrics_fn = lambda y, p: compute_metrics(
        metric_names, y if classification else transform.inverse(y), to_scores(p)
    )
    datamodule = VariantDataModule(variants.tokens, y_train_scale, split, train.batch_size, seed=train.seed)
    epochs: list[dict] = []

    def on_epoch(record: dict) -> None:
        if non_finite(record):  # files stay strict JSON; NonFiniteGuard fails the run right after
            record = {**_nulls(record), "non_finite": non_finite(record)}
        epochs.append(record)
        layout.append_line("metrics/metrics.jsonl", record)
        layout.event("epoch", **record)
        log.info("%s", epoch_text(record, train.max_epochs))

    callbacks = [EpochReporter(on_epoch), NonFiniteGuard()]
    if stop is not None:
        callbacks.append(stop.callback())
    trainer = build_trainer(
        train,
        layout.path("ckpts"),
        has_val=sizes["val"] > 0,
        callbacks=callbacks,
        limit_batches=limit_batches,
        task="classification" if classification else "regression",
        logs_dir=layout.path("logs"),
    )
    last = layout.path("ckpts/last.ckpt")
    resume = str(last) if last.exists() else None
    if resume:
        log.info("resuming from %s", last)
        layout.event("progress", phase="resume", checkpoint="ckpts/last.ckpt")
    layout.event("progress", phase="train", max_epochs=train.max_epochs)
    t_train = time.perf_counter()
    fit(trainer, module, datamodule, resume, stop)
    training_seconds = time.perf_counter() - t_train
    if stop is not None and stop.requested:
        trainer.save_checkpoint(str(last))
        layout.event("progress", phase="cancelled", checkpoint="ckpts/last.ckpt", epoch=int(trainer.current_epoch))
        raise Cancelled("stopped by SIGTERM; ckpts/last.ckpt saved")
    samples = sum(int(r.get("samples", 0)) for r in epochs)

    best = layout.path("ckpts/best.ckpt")
    from runner.core.selection import SelectionRule

    start_record = SelectionRule.of(trainer).start
    selected = "epoch"
    kept_epoch: int | None = None
    if best.exists():
        import torch

        checkpoint = torch.load(str(best), map_location=module.device, weights_only=False)
        module.load_state_dict(checkpoint["state_dict"])
        # saved at global step 0 after a start pass: no epoch was clearly above the untrained start
        if start_record is not None and int(checkpoint.get("global_step", -1)) == 0:
            selected = "start"
            log.info("no epoch was clearly above the start (before any optimiser step) on validation; kept it")
        elif isinstance(checkpoint.get("epoch"), int):
            kept_epoch = int(checkpoint["epoch"])
    pred_all = to_scores(predict(module, variants.tokens))
    check_predictions(pred_all)
    y_all = y_raw

    result: dict[str, Any] = {}
    for name in ("val", "test"):
        idx = split[name]
        result[name] = compute_metrics(metric_names, y_all[idx], pred_all[idx]) if len(idx) else {}
    result["train"] = compute_metrics(metric_names, y_all[split["train"]], pred_all[split["train"]])
    result["n"] = {**sizes, "selected": len(variants), "dropped": dict(variants.dropped)}
    result["epochs"] = len(epochs)
    # the epoch best.ckpt holds (with a fitted start, not always the highest val_spearman: see
    # training.LEAVE_START_Z); computed from the epoch records only for a run without best.ckpt
    result["best_epoch"] = (
        None if selected == "start" else kept_epoch if kept_epoch is not None else _best_epoch(epochs)
    )
    result["selected"] = selected
    if start_record is not None:
        result["start"] = _nulls(start_record)
    result["training_seconds"] = round(training_seconds, 3)
    result["samples_per_second"] = round(samples / training_seconds, 1) if training_seconds > 0 else None
    result["transform"] = transform.state()
    result["task"] = "classification" if classification else "regression"
    layout.write_json("metrics/metrics.json", result)

    _write_artifacts(layout, plan, module, variants, split, y_all, pred_all, transform)
    save_predict_state(layout, typed, variants, transform, result["task"])  # what `infra predict` needs
    try:
        _write_plots(layout, epochs, variants, split, y_all, pred_all, result, typed.data.target, plots, METRICS)
    except Exception:  # a plot must never fail a finished training run
        log.exception("writing plots failed")
    layout.event("progress", phase="done", test=result["test"], training_seconds=result["training_seconds"])
    return result


def epoch_text(record: dict, max_epochs: int) -> str:
    """One compact log line per epoch (1-based, as people count): the whole record is in logs/events.jsonl."""
    parts = [f"epoch {record['epoch'] + 1}/{max_epochs}"]
    for key in ("train_loss", "val_loss", "val_spearman"):
        value = record.get(key)
        if isinstance(value, int | float):
            parts.append(f"{key} {value:.4f}")
    return "  ".join(parts)


def _nulls(record: dict) -> dict:
    """`record` with NaN/infinite numbers (also in nested dicts) replaced by None."""
    return {
        k: _nulls(v) if isinstance(v, dict) else None if isinstance(v, float) and not np.isfinite(v) else v
        for k, v in record.items()
    }


def _data_error(message: str):
    from runner.errors import DataError

    return DataError(message)


def _best_epoch(epochs: list[dict]) -> int | None:
    # the epoch the checkpoint kept: the one training.monitored() follows
    if any(r.get("val_spearman") is not None for r in epochs):
        scored = [(-r["val_spearman"], r["epoch"]) for r in epochs if r.get("val_spearman") is not None]
    else:
        key = "val_loss" if any(r.get("val_loss") is not None for r in epochs) else "train_loss"
        scored = [(r[key], r["epoch"]) for r in epochs if r.get(key) is not None]
    return min(scored)[1] if scored else None


def _write_artifacts(layout: Layout, plan, module, variants, split, y_all, pred_all, transform) -> None:
    import pandas as pd
    import torch

    from runner.core.predict import write_predictions_csv

    hp = dict(module.hparams)
    buf = io.BytesIO()
    torch.save(
        {
            "model_name": hp["model_name"],
            "model_params": hp["model_params"],
            "hparams": hp,
            "embedding": {"name": hp["embedding_name"], "params": hp["embedding_params"]},
            "transform": transform.state(),
            "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        },
        buf,
    )
    layout.write_bytes("artifacts/model.pth", buf.getvalue())

    arrays = {}
    split_col = np.empty(len(variants.ids), dtype=object)
    for name, idx in split.items():
        arrays[f"{name}_ids"] = np.asarray(variants.ids)[idx]
        arrays[f"{name}_y_true"] = y_all[idx]
        arrays[f"{name}_y_pred"] = pred_all[idx]
        split_col[idx] = name
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    layout.write_bytes("artifacts/labels.npz", buf.getvalue())

    in_split = np.array([s is not None for s in split_col])
    frame = pd.DataFrame(
        {
            "id": np.asarray(variants.ids)[in_split],
            "mutant": variants.frame["mutant"].to_numpy()[in_split],
            "mut_num": np.asarray(variants.mut_num)[in_split],
            "split": split_col[in_split].astype(str),
            "y_true": y_all[in_split],
            "y_pred": pred_all[in_split],
        }
    )
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    layout.write_bytes("artifacts/predictions.parquet", buf.getvalue())
    write_predictions_csv(layout, frame, variants.frame["sequence"].array[in_split])


def _write_plots(layout, epochs, variants, split, y_all, pred_all, result, target, plots, metrics) -> None:
    write = layout.write_bytes
    vis = Path("artifacts/visualization")
    # every epoch on record, including those of an earlier attempt this run resumed from
    lines = layout.path("metrics/metrics.jsonl").read_text(encoding="utf-8").splitlines()
    history = {r["epoch"]: r for r in map(json.loads, filter(None, lines))}
    plots.learning_curves([history[k] for k in sorted(history)] or epochs, vis / "learning_curves.png", write)
    test = split["test"]
    plots.predicted_vs_measured(
        y_all[test],
        pred_all[test],
        result["test"].get("spearman"),
        target,
        vis / "predicted_vs_measured.png",
        write,
        regression=target == "DMS_score",
    )
    spearman = metrics.get("spearman")
    plots.per_mut_num(
        np.asarray(variants.mut_num)[test], y_all[test], pred_all[test], spearman, vis / "per_mut_num.png", write
    )
    plots.single_mutant_heatmap(
        variants.frame["mutant"].to_numpy()[test], y_all[test], pred_all[test], target,
        vis / "single_mutants.png", write,
    )  # fmt: skip
