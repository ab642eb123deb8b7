"""Class-wise accuracy and the bias measures of a vector of per-class accuracies (numpy only)."""

from __future__ import annotations

import numpy as np


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


def bias_measures(class_acc) -> dict[str, float]:
    """Spread of per-class accuracies: population std across classes, worst, best, and max - min gap."""
    acc = np.asarray(class_acc, dtype=np.float64)
    acc = acc[~np.isnan(acc)]
    return {"std": float(acc.std(ddof=0)), "worst": float(acc.min()), "best": float(acc.max()),
            "gap": float(acc.max() - acc.min())}
