"""PNG plots of a finished experiment (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path, write: Callable[[Path, bytes], None]) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write(path, buf.getvalue())


def learning_curves(epochs: list[dict], path: Path, write) -> None:
    """Train and validation loss per epoch."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        pts = [(r["epoch"], r[key]) for r in epochs if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=False), marker="o", ms=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (training scale)")
    ax.set_title("Learning curves")
    ax.legend()
    _save(plt, fig, path, write)


def predicted_vs_measured(
    y_true: np.ndarray, y_pred: np.ndarray, spearman: float | None, target: str, path: Path, write
) -> None:
    """Scatter of test predictions against measurements, the test Spearman in the title."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(y_true, y_pred, s=4, alpha=0.35, linewidths=0)
    ax.set_xlabel(f"measured {target}")
    ax.set_ylabel(f"predicted {target}")
    rho = "n/a" if spearman is None else f"{spearman:.3f}"
    ax.set_title(f"Test set: Spearman {rho} (n={len(y_true)})")
    _save(plt, fig, path, write)


def per_mut_num(
    mut_num: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, metric: Callable, path: Path, write
) -> None:
    """Test Spearman per number of mutations (bar labels give the count of variants)."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 4))
    levels = np.unique(mut_num)
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
