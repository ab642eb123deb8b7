"""Selection rules that turn per-example scores into kept training indices, and class keep ratios."""

from __future__ import annotations

import math

import numpy as np

from .errors import UserError


def num_kept(num_examples: int, sparsity: float) -> int:
    """n_keep = round((1 - s) * N), halves rounded up (not to even)."""
    return int(math.floor((1.0 - sparsity) * num_examples + 0.5))


def check_sparsity(sparsity: float, offset: float = 0.0) -> None:
    """One-line errors for a sparsity outside [0, 1) or an offset that leaves too few examples."""
    if not 0.0 <= sparsity < 1.0:
        raise UserError(f"sparsity must be in [0, 1), got {sparsity}")
    if not 0.0 <= offset < 1.0:
        raise UserError(f"offset must be in [0, 1), got {offset}")
    if offset + (1.0 - sparsity) > 1.0 + 1e-9:
        raise UserError(f"offset {offset} + keep fraction {1.0 - sparsity:g} exceeds 1: not enough examples to keep")


def select_indices(scores, sparsity: float, *, offset: float = 0.0) -> np.ndarray:
    """Indices (int64, ascending) of the round((1-s)N) highest scores, after skipping the top ``offset`` fraction.

    Ties are broken by index: of equal scores the lower index ranks as harder.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise UserError(f"scores must be one value per example, got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise UserError("scores contain NaN or infinite values")
    check_sparsity(sparsity, offset)
    n = len(scores)
    order = np.lexsort((np.arange(n), -scores))  # hardest first; the last key is the primary one
    keep = num_kept(n, sparsity)
    start = min(int(math.floor(offset * n + 0.5)), n - keep)
    kept = order[start:start + keep]
    return np.sort(kept).astype(np.int64)


def random_indices(num_examples: int, sparsity: float, *, seed: int) -> np.ndarray:
    """The random baseline: round((1-s)N) indices drawn uniformly without replacement (not class-balanced)."""
    check_sparsity(sparsity)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_examples, size=num_kept(num_examples, sparsity), replace=False)).astype(np.int64)


def class_keep_ratio(labels, kept_indices, num_classes: int) -> np.ndarray:
    """Per class: kept examples of the class / examples of the class (NaN for a class with none)."""
    labels = np.asarray(labels, dtype=np.int64)
    total = np.bincount(labels, minlength=num_classes).astype(np.float64)
    kept = np.bincount(labels[np.asarray(kept_indices, dtype=np.int64)], minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, kept / np.maximum(total, 1), np.nan)
