"""Regression metrics from targets and predictions (scikit-learn, scipy), one dict per split: per target and
averaged over targets."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import mean_absolute_error, r2_score, root_mean_squared_error

METRICS = ("mae", "rmse", "r2", "pearson", "spearman")


def regression_metrics(
    targets: np.ndarray, predictions: np.ndarray, target_names: Sequence[str], loss: float | None = None
) -> dict:
    """MAE, RMSE and R² (scikit-learn), Pearson's and Spearman's correlation (scipy; NaN when either side is
    constant) for each target of `(texts, targets)` arrays; the top-level values are their means over targets."""
    targets, predictions = np.asarray(targets, dtype=float), np.asarray(predictions, dtype=float)
    per_target = {}
    for k, name in enumerate(target_names):
        y, p = targets[:, k], predictions[:, k]
        constant = np.ptp(y) == 0 or np.ptp(p) == 0
        per_target[name] = {
            "mae": float(mean_absolute_error(y, p)),
            "rmse": float(root_mean_squared_error(y, p)),
            "r2": float(r2_score(y, p)),
            "pearson": float("nan") if constant else float(pearsonr(y, p).statistic),
            "spearman": float("nan") if constant else float(spearmanr(y, p).statistic),
        }
    metrics: dict = {"n": int(len(targets))}
    metrics |= {m: float(np.mean([t[m] for t in per_target.values()])) for m in METRICS}
    metrics |= {"per_target": per_target, "targets": list(target_names)}
    if loss is not None:
        metrics = {"loss": float(loss), **metrics}
    return metrics
