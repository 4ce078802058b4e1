"""PNG plots of a finished experiment (matplotlib, Agg backend: no display needed).

Each function renders into memory and hands the PNG's bytes to `write(path, data)` (the experiment's
atomic writer), so a reader never sees a half-written picture.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from runner.core.metrics import record_value

log = logging.getLogger(__name__)

# Above this many test variants the predicted-vs-measured plot shows density (hexagonal bins, counts
# on a log scale) instead of points: at 5,000 translucent points the middle of the cloud is already
# one solid blot, and GB1's 30k test variants hide where most of them lie (its mass of zeros).
DENSITY_THRESHOLD = 5000
# Amino acids grouped by property (positive, negative, polar, special, hydrophobic, aromatic), then
# stop: neighbouring rows of the heatmap behave alike, which is how DMS maps are usually read.
HEATMAP_AMINO_ACIDS = "RHKDESTNQCGPAVILMFYW*"
_SINGLE_PATTERN = r"^([A-Z*])([0-9]+)([A-Z*])$"


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


@contextlib.contextmanager
def closing_figures() -> Iterator[None]:
    """Close every figure opened inside the block, also those of a plot that failed half-way: a
    process that runs many experiments would otherwise keep each one's figures."""
    plt = _figure()
    before = set(plt.get_fignums())
    try:
        yield
    finally:
        for number in set(plt.get_fignums()) - before:
            plt.close(number)


def _save(plt, fig, path: Path, write: Callable[[Path, bytes], None]) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write(path, buf.getvalue())


def curve(epochs: list[dict], key: str, start: dict | None = None) -> tuple[list[int], list[float]]:
    """The points of `key` (val_loss, train_loss, val_spearman, val_<metric>) over a run: the start, when
    it was scored, at 0 (before the first epoch), trained epoch e (0-based in the records) at e + 1, as
    the logs count epochs. Undefined values are left out."""
    points = [] if start is None or record_value(start, key) is None else [(0, record_value(start, key))]
    points += [(r["epoch"] + 1, v) for r in epochs if (v := record_value(r, key)) is not None]
    return [x for x, _ in points], [y for _, y in points]


def kept_point(kept: dict | None, start_name: str = "fitted start") -> tuple[str, int, float | None, str] | None:
    """Where the kept model sits on its curve: (metric, x, value, label), e.g. ("val_spearman", 0, 0.7697,
    "kept: start (ridge fit) 0.770"); value None when it is undefined. None without a `kept` record."""
    if not kept or kept.get("model") not in ("start", "epoch", "closed_form"):
        return None
    value = kept.get("value")
    shown = "undefined" if value is None else f"{value:.3f}"
    if kept["model"] == "start":
        return kept["by"], 0, value, f"kept: start ({start_name}) {shown}"
    if kept["model"] == "closed_form":  # its one pass is epoch 1
        return kept["by"], 1, value, f"kept: closed-form fit {shown}"
    epoch = int(kept.get("epoch") or 0) + 1
    return kept["by"], epoch, value, f"kept: epoch {epoch} {shown}"


def learning_curves(
    epochs: list[dict],
    path: Path,
    write,
    start: dict | None = None,
    kept: dict | None = None,
    start_name: str = "fitted start",
) -> None:
    """Train and validation loss per epoch, and beside them the validation metric the kept model was
    selected by (the validation Spearman when it was a loss). Epochs count from 1 as in the logs; a
    scored start is drawn at 0; the kept model is starred with its value (`kept_point`)."""
    plt = _figure()
    from matplotlib.ticker import MaxNLocator

    marker = kept_point(kept, start_name)
    by = marker[0] if marker else "val_spearman"
    metric = by if by not in ("val_loss", "train_loss") else "val_spearman"
    metric_curve = curve(epochs, metric, start)
    if metric_curve[0]:
        fig, (ax, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
        axes = {"loss": ax, metric: ax_metric}
    else:
        fig, ax = plt.subplots(figsize=(6, 4))
        axes = {"loss": ax}
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        x, y = curve(epochs, key, start if key == "val_loss" else None)
        if x:
            ax.plot(x, y, marker="o", ms=3, label=label)
    ax.set_ylabel("loss (training scale)")
    ax.set_title("Losses")
    if metric_curve[0]:
        ax_metric.plot(*metric_curve, marker="o", ms=3, color="tab:green", label=metric)
        ax_metric.set_ylabel(metric.replace("_", " ", 1).replace("val ", "validation "))
        ax_metric.set_title(f"{metric} (kept model starred)" if metric == by else metric)
    if start is not None:
        for key, where in (("val_loss", ax), (metric, axes.get(metric))):
            value = record_value(start, key)
            if where is not None and value is not None:
                where.plot([0], [value], marker="s", ms=7, mfc="none", color="0.3", linestyle="none",
                           label=f"start ({start_name})")  # fmt: skip
    if marker is not None and marker[2] is not None:
        target = ax if by in ("val_loss", "train_loss") else axes.get(by)
        if target is not None:
            target.plot([marker[1]], [marker[2]], marker="*", ms=14, color="tab:red", linestyle="none",
                        label=marker[3])  # fmt: skip
    for where in axes.values():
        where.xaxis.set_major_locator(MaxNLocator(integer=True))
        where.set_xlabel("epoch (0: the start, before training)" if start is not None else "epoch")
        where.legend(loc="best", fontsize=8)
    fig.suptitle("Learning curves" + (f"; {marker[3]}" if marker else ""))
    _save(plt, fig, path, write)


def predicted_vs_measured(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    spearman: float | None,
    target: str,
    path: Path,
    write,
    regression: bool = True,
) -> str:
    """Test predictions against measurements: points, or density above `DENSITY_THRESHOLD` variants.

    Regression adds the y = x line on shared axes (a perfect model lies on it); a classifier's
    probabilities against 0/1 labels have no such line. Returns "points" or "density".
    """
    plt = _figure()
    y_true, y_pred = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float)
    fig, ax = plt.subplots(figsize=(5.6, 5))
    n = len(y_true)
    if n > DENSITY_THRESHOLD:
        bins = ax.hexbin(y_true, y_pred, gridsize=60, bins="log", mincnt=1, cmap="viridis", linewidths=0)
        fig.colorbar(bins, ax=ax, label="variants per bin (log scale)")
    else:
        ax.scatter(y_true, y_pred, s=5, alpha=0.4, linewidths=0)
    if regression and n:
        both = np.concatenate([y_true, y_pred])
        both = both[np.isfinite(both)]
        if both.size:
            low, high = float(both.min()), float(both.max())
            pad = 0.03 * (high - low or 1.0)
            low, high = low - pad, high + pad
            ax.plot([low, high], [low, high], linestyle="--", color="0.35", linewidth=1, label="y = x")
            ax.set_xlim(low, high)
            ax.set_ylim(low, high)
            ax.legend(loc="upper left")
    ax.set_xlabel(f"measured {target}")
    ax.set_ylabel(f"predicted {target}")
    rho = "n/a" if spearman is None else f"{spearman:.3f}"
    ax.set_title(f"Test set: Spearman {rho} (n={n:,})")
    _save(plt, fig, path, write)
    return "density" if n > DENSITY_THRESHOLD else "points"


def per_mut_num(
    mut_num: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, metric: Callable, path: Path, write
) -> bool:
    """Test Spearman per number of mutations (bar labels give the count of variants).

    Returns False and writes nothing when the test set has a single level (one bar says nothing the
    predicted-vs-measured title does not).
    """
    levels = np.unique(mut_num)
    if len(levels) < 2:
        return False
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 4))
    values = []
    counts = []
    for level in levels:
        sel = mut_num == level
        value = metric(y_true[sel], y_pred[sel]) if sel.sum() > 2 else float("nan")
        values.append(0.0 if value is None or np.isnan(value) else value)
        counts.append(int(sel.sum()))
    bars = ax.bar([str(int(v)) for v in levels], values)
    for bar, count in zip(bars, counts, strict=False):
        ax.annotate(
            f"n={count}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8
        )
    ax.set_xlabel("mutations per variant")
    ax.set_ylabel("test Spearman")
    ax.set_title("Test Spearman by number of mutations")
    _save(plt, fig, path, write)
    return True


def single_mutant_means(mutants, y_true: np.ndarray, y_pred: np.ndarray):
    """Mean measured and predicted value per (position, amino acid) over the single mutants.

    Returns `(labels, measured, predicted)`: `labels` the positions seen ("H24": wild type and
    1-based position), the two arrays `len(HEATMAP_AMINO_ACIDS) × len(labels)` with NaN where no
    single mutant was measured; None when there is no single mutant. Vectorised (pandas string ops).
    """
    import pandas as pd

    parts = pd.Series(np.asarray(mutants, dtype=object)).astype(str).str.extract(_SINGLE_PATTERN)
    aa_row = pd.Series(parts[2]).map({a: i for i, a in enumerate(HEATMAP_AMINO_ACIDS)})
    keep = (parts[1].notna() & aa_row.notna()).to_numpy()
    if not keep.any():
        return None
    position = parts[1][keep].astype(np.int64).to_numpy()
    wild_type = parts[0][keep].to_numpy()
    frame = pd.DataFrame(
        {
            "position": position,
            "aa": aa_row[keep].astype(np.int64).to_numpy(),
            "measured": np.asarray(y_true, dtype=float)[keep],
            "predicted": np.asarray(y_pred, dtype=float)[keep],
        }
    )
    positions, column = np.unique(position, return_inverse=True)
    first = np.unique(position, return_index=True)[1]
    labels = [f"{wt}{pos}" for wt, pos in zip(wild_type[first], positions, strict=True)]
    frame["column"] = column
    means = frame.groupby(["aa", "column"])[["measured", "predicted"]].mean()
    shape = (len(HEATMAP_AMINO_ACIDS), len(positions))
    out = []
    for name in ("measured", "predicted"):
        grid = np.full(shape, np.nan)
        grid[means.index.get_level_values(0), means.index.get_level_values(1)] = means[name].to_numpy()
        out.append(grid)
    return labels, out[0], out[1]


def single_mutant_heatmap(mutants, y_true: np.ndarray, y_pred: np.ndarray, target: str, path: Path, write) -> bool:
    """Position × amino acid heatmaps of the mean measured and mean predicted value of single mutants.

    Each panel has its own colour scale (its 2nd–98th percentile, so a few extreme cells do not wash
    out the rest): the patterns compare, while calibration is what predicted-vs-measured shows (a
    shared scale painted an under-trained model's narrow predictions one flat colour). Cells
    without a single mutant in the test set are grey. Panels sit side by side for up to 40
    positions and one above the other beyond (so position columns line up). Returns False and
    writes nothing when there is no single mutant.
    """
    means = single_mutant_means(mutants, y_true, y_pred)
    if means is None:
        return False
    labels, measured, predicted = means
    plt = _figure()
    import matplotlib as mpl

    n_pos = len(labels)
    cmap = mpl.colormaps["viridis"].with_extremes(bad="0.85")
    wide = n_pos > 40
    cell = 0.16
    if wide:
        width = float(np.clip(n_pos * cell + 2, 8, 40))
        fig, axes = plt.subplots(2, 1, figsize=(width, 2 * len(HEATMAP_AMINO_ACIDS) * cell + 2), sharex=True)
    else:
        width = float(np.clip(2 * n_pos * 0.3 + 5, 7, 20))
        fig, axes = plt.subplots(1, 2, figsize=(width, len(HEATMAP_AMINO_ACIDS) * 0.22 + 1.5), sharey=True)
    step = max(1, int(np.ceil(n_pos / 60)))  # at most ~60 position labels
    for ax, grid, name in zip(axes, (measured, predicted), ("measured", "predicted"), strict=True):
        finite = grid[np.isfinite(grid)]
        vmin, vmax = np.percentile(finite, [2, 98]) if finite.size else (0.0, 1.0)
        if vmin == vmax:
            vmin, vmax = vmin - 0.5, vmax + 0.5
        image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax,
                          interpolation="nearest")  # fmt: skip
        fig.colorbar(image, ax=ax, label=f"mean {name}", shrink=0.9, pad=0.01)
        ax.set_title(f"mean {name} {target}")
        ax.set_yticks(range(len(HEATMAP_AMINO_ACIDS)), list(HEATMAP_AMINO_ACIDS), fontsize=7)
        ax.set_xticks(range(0, n_pos, step), labels[::step], rotation=90, fontsize=7)
    axes[0].set_ylabel("substituted amino acid")
    axes[-1].set_xlabel("position (wild type + number)")
    if not wide:
        axes[0].set_xlabel("position (wild type + number)")
    fig.suptitle(f"Single mutants in the test set ({int(np.isfinite(measured).sum()):,} cells)")
    _save(plt, fig, path, write)
    return True
