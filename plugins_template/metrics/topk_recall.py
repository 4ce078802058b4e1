"""Top-k recall: of the truly best variants, how many does the model rank among its best?

Registered as `topk_recall`. It answers the engineering question behind a screen — "if I test the
model's top 10 %, how many of the real top 10 % do I find?" — which Spearman over all variants does
not. 0.1 (the share) means random ranking; 1.0 is perfect.

    {"metrics": ["spearman", "topk_recall"]}
"""

import numpy as np

from runner.core.metrics import register_metric


@register_metric("topk_recall")
def topk_recall(y_true, y_pred, top_fraction: float = 0.1) -> float:
    y_true = np.asarray(y_true, dtype=np.float64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.float64).ravel()
    k = max(1, int(round(top_fraction * y_true.size)))
    true_top = np.argpartition(-y_true, k - 1)[:k]
    pred_top = np.argpartition(-y_pred, k - 1)[:k]
    return float(np.intersect1d(true_top, pred_top).size / k)
