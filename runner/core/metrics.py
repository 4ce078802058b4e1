"""Metric registry: numpy/scipy functions `metric(y_true, y_pred, **params) -> float`.

`y_pred` is on the original target scale for regression and the predicted probability of the
positive class for binary classification. `auc` and `mcc` binarise a continuous `y_true` at
`threshold` (default: its median); `mcc` binarises `y_pred` at `pred_threshold` (default: 0.5 when
`y_true` is already 0/1, otherwise the same threshold as `y_true`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy import stats

from runner.core.registry import Registry

METRICS: Registry[float] = Registry("metric")


def register_metric(name: str, fn: Callable[..., float] | None = None):
    """Register `fn(y_true, y_pred, **params) -> float` under `name`; also a decorator."""
    return METRICS.register(name, fn)


def _arrays(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(y_true, dtype=np.float64).ravel(), np.asarray(y_pred, dtype=np.float64).ravel()


def _is_binary(y: np.ndarray) -> bool:
    return bool(np.isin(y, (0.0, 1.0)).all())


def _binarise_true(y: np.ndarray, threshold: float | None) -> tuple[np.ndarray, float | None]:
    if threshold is None and _is_binary(y):
        return y.astype(bool), None
    cut = float(np.median(y)) if threshold is None else float(threshold)
    return y > cut, cut


def _constant(a: np.ndarray) -> bool:
    return a.size < 2 or bool(np.all(a == a[0]))


@register_metric("spearman")
def spearman(y_true, y_pred) -> float:
    t, p = _arrays(y_true, y_pred)
    if _constant(t) or _constant(p):
        return float("nan")
    return float(stats.spearmanr(t, p).statistic)


def spearman_gain_z(y_true, y_pred, reference) -> float:
    """How many standard errors `y_pred`'s Spearman with `y_true` lies above `reference`'s, on the same rows.

    The two correlations share `y_true` and two predictions of one model family are strongly
    correlated, so the standard error of their difference is far below that of either correlation: the
    test of Meng, Rosenthal & Rubin (1992, "Comparing correlated correlation coefficients", Psychological
    Bulletin 111:172) on the ranks, with the variance 1.06/(n-3) of a Spearman's Fisher z (Fieller,
    Hartley & Pearson 1957) in place of Pearson's 1/(n-3). Positive: `y_pred` ranks better. Identical
    rankings give 0; an undefined (constant) `y_pred` gives -inf, an undefined `reference` +inf.
    """
    t, p = _arrays(y_true, y_pred)
    q = np.asarray(reference, dtype=np.float64).ravel()
    if _constant(t) or _constant(p):
        return float("-inf")
    if _constant(q):
        return float("inf")
    n = t.size
    ranks = np.stack([stats.rankdata(t), stats.rankdata(p), stats.rankdata(q)])
    corr = np.corrcoef(ranks)
    r1, r2, rx = float(corr[0, 1]), float(corr[0, 2]), float(corr[1, 2])
    if r1 == r2:
        return 0.0
    if n <= 3 or rx >= 1.0:
        return math.copysign(float("inf"), r1 - r2)
    r1, r2 = (min(max(r, -0.999999), 0.999999) for r in (r1, r2))
    mean_sq = (r1 * r1 + r2 * r2) / 2
    f = min((1 - rx) / (2 * (1 - mean_sq)), 1.0)
    h = (1 - f * mean_sq) / (1 - mean_sq)
    return float((math.atanh(r1) - math.atanh(r2)) * math.sqrt((n - 3) / (2 * (1 - rx) * h * 1.06)))


@register_metric("pearson")
def pearson(y_true, y_pred) -> float:
    t, p = _arrays(y_true, y_pred)
    if _constant(t) or _constant(p):
        return float("nan")
    return float(stats.pearsonr(t, p).statistic)


@register_metric("mse")
def mse(y_true, y_pred) -> float:
    t, p = _arrays(y_true, y_pred)
    return float(np.mean((t - p) ** 2)) if t.size else float("nan")


@register_metric("rmse")
def rmse(y_true, y_pred) -> float:
    return math.sqrt(mse(y_true, y_pred))


@register_metric("mae")
def mae(y_true, y_pred) -> float:
    t, p = _arrays(y_true, y_pred)
    return float(np.mean(np.abs(t - p))) if t.size else float("nan")


@register_metric("ndcg")
def ndcg(y_true, y_pred, top_fraction: float = 0.1) -> float:
    """NDCG of the top `top_fraction` of variants ranked by prediction (ProteinGym style).

    Gains are the true scores shifted to be non-negative, so the measure rewards putting the
    truly best variants at the top of the predicted ranking.
    """
    t, p = _arrays(y_true, y_pred)
    if t.size == 0:
        return float("nan")
    k = max(1, int(math.ceil(top_fraction * t.size)))
    gains = t - t.min()
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = float(np.sum(gains[np.argsort(-p, kind="stable")[:k]] * discounts))
    idcg = float(np.sum(np.sort(gains)[::-1][:k] * discounts))
    return dcg / idcg if idcg > 0 else float("nan")


@register_metric("auc")
def auc(y_true, y_pred, threshold: float | None = None) -> float:
    """ROC AUC (Mann–Whitney form, ties counted half) of `y_pred` for the binarised `y_true`."""
    t, p = _arrays(y_true, y_pred)
    labels, _ = _binarise_true(t, threshold)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(p)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@register_metric("mcc")
def mcc(y_true, y_pred, threshold: float | None = None, pred_threshold: float | None = None) -> float:
    """Matthews correlation of binarised truth and prediction."""
    t, p = _arrays(y_true, y_pred)
    labels, cut = _binarise_true(t, threshold)
    if pred_threshold is None:
        pred_threshold = 0.5 if cut is None else cut
    pred = p > pred_threshold if cut is not None else p >= pred_threshold
    tp = float(np.sum(labels & pred))
    tn = float(np.sum(~labels & ~pred))
    fp = float(np.sum(~labels & pred))
    fn = float(np.sum(labels & ~pred))
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom > 0 else 0.0


# Which way is better, for `train.select_by` (runner.core.selection). A plugin metric states it with
# an attribute of its function, `fn.greater_is_better = True` (or False); without one it cannot select.
GREATER_IS_BETTER = {
    "spearman": True,
    "pearson": True,
    "ndcg": True,
    "auc": True,
    "mcc": True,
    "mse": False,
    "rmse": False,
    "mae": False,
}


def greater_is_better(name: str) -> bool | None:
    """True when a higher value of metric `name` is better, False when lower is, None when it does not say."""
    flag = getattr(METRICS.get(name), "greater_is_better", None)
    return flag if isinstance(flag, bool) else GREATER_IS_BETTER.get(name)


def record_value(record: dict | None, name: str) -> float | None:
    """The value of `name` (val_loss, val_spearman, train_loss, or val_<metric>) in an epoch record or
    the start's record (metrics.jsonl's shape); None when it was not measured or is undefined."""
    if not record:
        return None
    if name in ("val_loss", "val_spearman", "train_loss"):
        value = record.get(name)
    else:
        value = (record.get("val") or {}).get(name[len("val_") :])
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def undefined_reason(y_true, y_pred) -> str:
    """Why a metric came out NaN on these rows, in a few words (metrics.json `undefined`).

    Every built-in metric is undefined only for one of these: too few rows, a constant measured value
    (a correlation, and NDCG, need spread; AUC needs both classes), or a constant prediction (a
    correlation with nothing ranked: a one-hot model at positions its training never saw).
    """
    t, p = _arrays(y_true, y_pred)
    if t.size == 0:
        return "no rows"
    if t.size < 2:
        return "a single row"
    if _constant(t):
        return "constant measured values"
    if _constant(p):
        return "constant predictions"
    return "the metric is undefined (NaN) on these rows"


def compute_metrics(names: list[str], y_true, y_pred) -> dict[str, float | None]:
    """Every named metric on one split; NaN (undefined, e.g. a constant prediction) becomes None for JSON."""
    out: dict[str, float | None] = {}
    for name in names:
        value = float(METRICS.get(name)(y_true, y_pred))
        out[name] = None if math.isnan(value) else value
    return out


def undefined_metrics(names: list[str], y_true, y_pred, values: dict[str, float | None]) -> dict[str, str]:
    """The reason (`undefined_reason`) for each metric of `values` that is None, by name."""
    missing = [name for name in names if values.get(name) is None]
    if not missing:
        return {}
    reason = undefined_reason(y_true, y_pred)
    return dict.fromkeys(missing, reason)
