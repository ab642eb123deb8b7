"""Class-wise accuracy and the measures of class-wise bias (numpy only).

:func:`spread` measures one run's class accuracies (vectorised, so the bootstrap can measure thousands of
replicates at once); :func:`change_vs_dense` compares a run with the dense run of the same seed.
"""

from __future__ import annotations

import math

import numpy as np

WORST_FRACTION = 0.1  # "worst 10 %": the mean over the worst tenth of the classes (at least one class)


def class_accuracy(predictions, labels, num_classes: int) -> np.ndarray:
    """Recall of each class on the given examples: correct / examples of that class (NaN if none)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels, dtype=np.int64)
    if predictions.shape != labels.shape:
        raise ValueError(f"{predictions.shape} predictions for {labels.shape} labels")
    total = np.bincount(labels, minlength=num_classes).astype(np.float64)
    correct = np.bincount(labels[predictions == labels], minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, correct / np.maximum(total, 1), np.nan)


def overall_accuracy(predictions, labels) -> float:
    """Fraction of examples predicted correctly."""
    return float(np.mean(np.asarray(predictions) == np.asarray(labels)))


def spread(class_acc: np.ndarray) -> dict[str, np.ndarray]:
    """Spread of class accuracies over the last axis ([..., C]): population std, worst, best, max - min gap,
    coefficient of variation (std / mean) and the mean of the worst :data:`WORST_FRACTION` of classes."""
    acc = np.asarray(class_acc, dtype=np.float64)
    worst_k = max(1, math.ceil(WORST_FRACTION * acc.shape[-1]))
    std, mean = acc.std(-1), acc.mean(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cv = np.where(mean > 0, std / np.maximum(mean, 1e-300), np.nan)
    return {"std": std, "worst": acc.min(-1), "best": acc.max(-1), "gap": acc.max(-1) - acc.min(-1), "cv": cv,
            "worst_10pct": np.sort(acc, axis=-1)[..., :worst_k].mean(-1)}


def bias_measures(class_acc) -> dict[str, float]:
    """:func:`spread` of one run's class accuracies, classes without test examples (NaN) left out."""
    acc = np.asarray(class_acc, dtype=np.float64)
    return {name: float(value) for name, value in spread(acc[~np.isnan(acc)]).items()}


def rank_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rho between ``a`` and ``b`` over the last axis (broadcast; ties get average ranks); NaN where
    either is constant."""
    from scipy.stats import rankdata  # here: a bare GPU worker computing runs needs no scipy

    ra, rb = rankdata(a, axis=-1), rankdata(b, axis=-1)
    ra, rb = ra - ra.mean(-1, keepdims=True), rb - rb.mean(-1, keepdims=True)
    norm = np.sqrt((ra ** 2).sum(-1) * (rb ** 2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, (ra * rb).sum(-1) / np.where(norm > 0, norm, 1.0), np.nan)


# Class keep ratios spanning less than this are flat: a class-balanced rule's ratios differ by rounding alone,
# and a rank correlation of rounding with anything is noise.
FLAT_KEEP_RATIO_RANGE = 0.02


def change_vs_dense(class_acc: np.ndarray, dense_class_acc: np.ndarray,
                    keep_ratio: np.ndarray) -> dict[str, np.ndarray]:
    """A pruned run against the dense run of the same seed (last axis: classes): the mean absolute change of
    class accuracy, and the rank correlation between the run's class keep ratio and the dense class error
    (positive: the rule keeps more of the classes the dense model gets wrong; NaN where the keep ratios are flat,
    spanning less than :data:`FLAT_KEEP_RATIO_RANGE`)."""
    acc, dense = np.asarray(class_acc, dtype=np.float64), np.asarray(dense_class_acc, dtype=np.float64)
    keep = np.broadcast_to(np.asarray(keep_ratio, dtype=np.float64), dense.shape)
    correlation = rank_correlation(keep, 1.0 - dense)
    flat = np.ptp(keep, axis=-1) < FLAT_KEEP_RATIO_RANGE
    return {"mean_abs_change": np.abs(acc - dense).mean(-1),
            "keep_error_spearman": np.where(flat, np.nan, correlation)}
