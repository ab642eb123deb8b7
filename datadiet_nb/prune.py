"""Selection rules that turn per-example scores into kept training indices, and class keep ratios."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from .errors import UserError


# Every selection rule a preset can name, and the stored score it ranks or draws by (None: none).
RULES: dict[str, str | None] = {
    "el2n": "el2n", "grand": "grand", "random": None,  # the paper's: the highest scores / uniform over the set
    "random-balanced": None, "el2n-balanced": "el2n", "grand-balanced": "grand",  # the same fraction of every class
    "el2n-matched": "el2n", "grand-matched": "grand",  # the score's per-class counts, uniform within class
    "ccs": "el2n",  # coverage-centric coreset selection over EL2N
    "drop": None, "drop-el2n": "el2n",  # DRoP's error-proportional quotas; within class at random / by EL2N
    "forgetting": "forgetting",  # the most forgotten examples (Toneva et al.)
    "el2n-easy": "el2n", "grand-easy": "grand",  # the lowest scores: what pays when data is scarce (Sorscher et al.)
}
# Bumped whenever a rule's selection changes, so a stored pruned run is not reused for another selection
# (2: fractions of N computed exactly from the sparsity as written; keep-easy is the complement of keep-hard at ties)
SELECTION_VERSION = 2
# the rules that rank the whole training set by a score, so that an offset (skip the hardest) applies
OFFSET_RULES = ("el2n", "grand", "el2n-matched", "grand-matched", "forgetting")


def as_written(fraction: float) -> Fraction:
    """A float as the decimal it prints as (0.3 is 3/10, not the binary 0.29999999999999998889...)."""
    return Fraction(repr(float(fraction)))


def fraction_of(fraction: float, num_examples: int) -> int:
    """round(fraction * N), halves rounded up, computed exactly from the fraction as written: 0.3 of 45 is 13.5,
    and so 14."""
    return math.floor(as_written(fraction) * num_examples + Fraction(1, 2))


def num_kept(num_examples: int, sparsity: float) -> int:
    """n_keep = round((1 - s) N), halves rounded up, computed exactly: at s = 0.3, 45 examples keep 32 (31.5 rounded
    up), where the float product (1 - 0.3) * 45 = 31.499999999999996 would give 31."""
    return math.floor((1 - as_written(sparsity)) * num_examples + Fraction(1, 2))


def check_sparsity(sparsity: float, offset: float = 0.0) -> None:
    """One-line errors for a sparsity outside [0, 1) or an offset that leaves too few examples."""
    if not 0.0 <= sparsity < 1.0:
        raise UserError(f"sparsity must be in [0, 1), got {sparsity}")
    if not 0.0 <= offset < 1.0:
        raise UserError(f"offset must be in [0, 1), got {offset}")
    if offset + (1.0 - sparsity) > 1.0 + 1e-9:
        raise UserError(f"offset {offset} + keep fraction {1.0 - sparsity:g} exceeds 1: not enough examples to keep")


def hardest_first(scores: np.ndarray) -> np.ndarray:
    """Positions of ``scores`` from the highest score to the lowest; of equal scores the lower position first."""
    return np.lexsort((np.arange(len(scores)), -scores))  # the last key is the primary one


def easiest_first(scores: np.ndarray) -> np.ndarray:
    """Positions of ``scores`` from the lowest score to the highest: :func:`hardest_first` reversed, so of equal
    scores the higher position comes first, and the k easiest are exactly what the N - k hardest leave out."""
    return hardest_first(scores)[::-1]


def select_indices(scores, sparsity: float, *, offset: float = 0.0, easiest: bool = False) -> np.ndarray:
    """Indices (int64, ascending) of the round((1-s)N) highest scores (``easiest``: lowest), after skipping the
    first ``offset`` fraction of that order.

    Ties are broken by index: of equal scores the hardest keep the lower index and the easiest the higher one,
    so that keep-easy at k examples is the complement of keep-hard at N - k.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise UserError(f"scores must be one value per example, got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise UserError("scores contain NaN or infinite values")
    check_sparsity(sparsity, offset)
    n = len(scores)
    order = easiest_first(scores) if easiest else hardest_first(scores)
    keep = num_kept(n, sparsity)
    start = min(fraction_of(offset, n), n - keep)
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


def largest_remainder(shares, total: int, caps=None) -> np.ndarray:
    """Integers summing to ``total`` (normally the rounded sum of ``shares``): each share's floor, then one more for
    the largest fractional parts (ties: the lower index), never above ``caps`` (per entry) when given."""
    shares = np.asarray(shares, dtype=np.float64)
    counts = np.floor(shares + 1e-9).astype(np.int64)  # 2.9999999999 is 3
    room = np.full(len(shares), total) if caps is None else np.asarray(caps, dtype=np.int64) - counts
    for index in np.lexsort((np.arange(len(shares)), counts - shares)):  # largest remainder first
        if counts.sum() >= total:
            break
        if room[index] > 0:
            counts[index] += 1
    return counts


def _kept_per_class(labels: np.ndarray, counts: np.ndarray, scores: np.ndarray | None, seed: int | None
                    ) -> np.ndarray:
    """``counts[c]`` examples of each class c: its highest scores (ties: the lower index), or with ``scores=None``
    a uniform draw with ``seed``; ascending int64 indices."""
    rng = np.random.default_rng(seed)
    kept = [np.empty(0, dtype=np.int64)]
    for c, count in enumerate(counts):
        members = np.flatnonzero(labels == c)
        if scores is None:
            kept.append(rng.choice(members, size=count, replace=False))
        else:
            kept.append(members[hardest_first(scores[members])[:count]])
    return np.sort(np.concatenate(kept)).astype(np.int64)


def class_balanced_indices(scores, labels, sparsity: float, num_classes: int, *, seed: int | None = None
                           ) -> np.ndarray:
    """The same fraction of every class: round((1 - s) N) examples in all, (1 - s) n_c of class c by largest
    remainder; within a class the highest scores, or with ``scores=None`` a uniform draw with ``seed``."""
    check_sparsity(sparsity)
    labels = np.asarray(labels, dtype=np.int64)
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != labels.shape or not np.isfinite(scores).all():
            raise UserError(f"scores must be one finite value per example ({len(labels)}), got shape {scores.shape}")
    sizes = np.bincount(labels, minlength=num_classes)
    counts = largest_remainder((1.0 - sparsity) * sizes, num_kept(len(labels), sparsity), caps=sizes)
    return _kept_per_class(labels, counts, scores, seed)


def matched_random_indices(labels, reference_kept, num_classes: int, *, seed: int) -> np.ndarray:
    """As many examples of each class as ``reference_kept`` holds, drawn uniformly within the class: the ablation
    that keeps a score's "how many per class" and randomises "which"."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels[np.asarray(reference_kept, dtype=np.int64)], minlength=num_classes)
    return _kept_per_class(labels, counts, None, seed)


def drop_indices(class_error, labels, sparsity: float, num_classes: int, *, scores=None, seed: int) -> np.ndarray:
    """DRoP (Vysogorets et al., ICLR 2025): :func:`drop_quotas` of round((1 - s) N) examples from the classes'
    error rates; within a class uniformly at random (``seed``), or the highest ``scores``."""
    check_sparsity(sparsity)
    labels = np.asarray(labels, dtype=np.int64)
    quotas = drop_quotas(class_error, np.bincount(labels, minlength=num_classes), num_kept(len(labels), sparsity))
    return _kept_per_class(labels, quotas, None if scores is None else np.asarray(scores, dtype=np.float64), seed)


def drop_quotas(class_error, class_sizes, n_keep: int) -> np.ndarray:
    """DRoP's per-class keep counts: proportional to each class's error rate, none above its class size (what a
    full class cannot take goes to the others, in proportion), summing to ``n_keep``. With no error left among
    the classes that are not full, the rest is shared in proportion to class size."""
    error = np.asarray(class_error, dtype=np.float64)
    sizes = np.asarray(class_sizes, dtype=np.int64)
    if not 0 <= n_keep <= sizes.sum():
        raise UserError(f"cannot keep {n_keep} of {sizes.sum()} examples")
    if not np.isfinite(error).all() or (error < 0).any():
        raise UserError("class error rates must be finite and >= 0")
    full = np.zeros(len(sizes), dtype=bool)
    while True:
        weights = np.where(full, 0.0, error)
        if weights.sum() == 0:
            weights = np.where(full, 0.0, sizes.astype(np.float64))
        shares = np.where(full, sizes, (n_keep - sizes[full].sum()) * weights / max(weights.sum(), 1e-300))
        over = ~full & (shares > sizes)
        if not over.any():
            return largest_remainder(shares, n_keep, caps=sizes)
        full |= over


def ccs_bins(scores, beta: float, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """CCS's strata: (the indices left once the hardest ``beta`` fraction is cut, each one's bin in ``range(bins)``),
    bins of equal width over the remaining scores' range (the last bin includes the maximum). The cut is
    round(beta N) examples, halves rounded up as in :func:`num_kept`."""
    scores = np.asarray(scores, dtype=np.float64)
    order = hardest_first(scores)
    left = np.sort(order[fraction_of(beta, len(scores)):])
    low, high = scores[left].min(), scores[left].max()
    width = (high - low) / bins
    which = np.zeros(len(left), dtype=np.int64) if width == 0 else np.minimum(
        ((scores[left] - low) / width).astype(np.int64), bins - 1)
    return left, which


def ccs_indices(scores, sparsity: float, *, beta: float, bins: int, seed: int) -> np.ndarray:
    """Coverage-centric coreset selection (Zheng et al., ICLR 2023): cut the hardest ``beta`` fraction, cut the rest
    into ``bins`` equal-width score strata, then, smallest stratum first, take from each stratum
    min(its size, budget left / strata left) examples uniformly at random (``seed``); ascending int64 indices."""
    check_sparsity(sparsity)
    if not 0 <= beta < 1 or bins < 1:
        raise UserError(f"CCS needs 0 <= beta < 1 and bins >= 1, got beta={beta:g}, bins={bins}")
    scores = np.asarray(scores, dtype=np.float64)
    budget = num_kept(len(scores), sparsity)
    left, which = ccs_bins(scores, beta, bins)
    if budget > len(left):
        raise UserError(f"CCS with beta={beta:g} keeps at most {len(left)} of {len(scores)} examples, but sparsity "
                        f"{sparsity:g} keeps {budget}: lower beta or raise the sparsity")
    rng = np.random.default_rng(seed)
    strata = sorted((np.flatnonzero(which == b) for b in range(bins)), key=len)  # stable: lower bin first on ties
    kept = [np.empty(0, dtype=np.int64)]
    for remaining, stratum in zip(range(len(strata), 0, -1), strata):
        take = min(len(stratum), budget // remaining)
        kept.append(left[rng.choice(stratum, size=take, replace=False)])
        budget -= take
    return np.sort(np.concatenate(kept)).astype(np.int64)
