"""What a finished training leaves besides metrics.json: the model, labels, predictions and plots."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from runner.core import plots
from runner.core.layout import Layout
from runner.core.metrics import METRICS
from runner.core.predict import write_predictions_csv


def write_artifacts(layout: Layout, module, variants, split, y_all, pred_all, transform) -> None:
    """artifacts/model.pth (weights and what rebuilds the model), labels.npz and predictions.parquet/.csv
    (every row in a split, measured and predicted on the original scale)."""
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


def epoch_history(layout: Layout, epochs: list[dict]) -> list[dict]:
    """Every trained epoch on record, in order, including those of an earlier attempt this run resumed
    from (metrics/metrics.jsonl; a repeated epoch's last record holds); `epochs` when there is none."""
    path = layout.path("metrics/metrics.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    history = {r["epoch"]: r for r in map(json.loads, filter(None, lines))}
    return [history[k] for k in sorted(history)] or list(epochs)


def write_plots(layout: Layout, history, variants, split, y_all, pred_all, result, target, start_name) -> None:
    """The PNGs of artifacts/visualization/ (which ones: docs/experiments.md); `history` as `epoch_history`."""
    write = layout.write_bytes
    vis = Path("artifacts/visualization")
    plots.learning_curves(
        history, vis / "learning_curves.png", write, start=result.get("start"), kept=result.get("kept"),
        start_name=start_name,
    )  # fmt: skip
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
    spearman = METRICS.get("spearman")
    plots.per_mut_num(
        np.asarray(variants.mut_num)[test], y_all[test], pred_all[test], spearman, vis / "per_mut_num.png", write
    )
    plots.single_mutant_heatmap(
        variants.frame["mutant"].to_numpy()[test], y_all[test], pred_all[test], target,
        vis / "single_mutants.png", write,
    )  # fmt: skip
