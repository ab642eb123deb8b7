"""Uncertainty of the study's numbers: bootstrap intervals over seeds and test examples, the spread of
class accuracies corrected for test-set noise, and the paired test of "spread below dense".

Method (also in the book's method chapter): a bootstrap replicate draws the seeds with replacement and,
independently, the test examples with replacement *within each class* (the same draw for every run, since
all runs share one test set); each run's statistic is recomputed on the drawn examples and averaged over the
drawn seeds. The 95 % interval is the 2.5th to 97.5th percentile of :data:`BOOTSTRAP_SAMPLES` replicates.
With few seeds the seed part of the interval is optimistic: read every interval with its seed count.
"""

from __future__ import annotations

import numpy as np
from scipy import stats as scipy_stats

from .metrics import change_vs_dense, spread

BOOTSTRAP_SAMPLES = 1000
CONFIDENCE = 0.95
BOOTSTRAP_SEED = 0  # the bootstrap is seeded: the same records give the same intervals
RUN_STATISTICS = ("overall_accuracy", "class_std", "class_std_corrected", "worst_class_accuracy", "class_gap",
                  "class_cv", "worst_10pct_accuracy")
VS_DENSE_STATISTICS = ("mean_abs_change", "keep_error_spearman")  # of a pruned run against the dense run of its seed


def corrected_std(class_acc: np.ndarray, class_sizes: np.ndarray) -> np.ndarray:
    """Population std of class accuracies less the binomial test noise: sqrt(max(0, s^2 - mean_c p_c(1-p_c)/n_c)).

    ``class_acc``: [..., C]; the noise a class of n_c test images adds to the observed variance is p_c(1-p_c)/n_c.
    """
    acc = np.asarray(class_acc, dtype=np.float64)
    noise = (acc * (1 - acc) / np.asarray(class_sizes, dtype=np.float64)).mean(-1)
    return np.sqrt(np.maximum(0.0, acc.var(-1) - noise))


def corrected_std_interval(class_acc: np.ndarray, class_sizes: np.ndarray, *, samples: int = BOOTSTRAP_SAMPLES,
                           seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95 % parametric bootstrap interval of :func:`corrected_std` for one set of class accuracies measured on
    ``class_sizes`` images each (each replicate draws every class's hits from a binomial at its accuracy)."""
    acc, sizes = np.asarray(class_acc, dtype=np.float64), np.asarray(class_sizes, dtype=np.int64)
    rng = np.random.default_rng(seed)
    drawn = rng.binomial(sizes, acc, size=(samples, len(acc))) / sizes
    return interval(corrected_std(drawn, sizes))


def run_statistics(class_acc: np.ndarray, class_sizes: np.ndarray) -> dict[str, np.ndarray]:
    """Per run (rows of ``class_acc`` [..., C]): overall accuracy, class std (raw and corrected), worst class,
    max - min gap, coefficient of variation and the mean of the worst 10 % of classes (see :func:`.metrics.spread`)."""
    acc = np.asarray(class_acc, dtype=np.float64)
    sizes = np.asarray(class_sizes, dtype=np.float64)
    measures = spread(acc)
    return {"overall_accuracy": (acc * sizes).sum(-1) / sizes.sum(), "class_std": measures["std"],
            "class_std_corrected": corrected_std(acc, sizes), "worst_class_accuracy": measures["worst"],
            "class_gap": measures["gap"], "class_cv": measures["cv"], "worst_10pct_accuracy": measures["worst_10pct"]}


def bootstrap_class_accuracy(correct: list[np.ndarray], *, samples: int = BOOTSTRAP_SAMPLES,
                             rng: np.random.Generator) -> np.ndarray:
    """Class accuracies of every run on ``samples`` resampled test sets: [samples, runs, classes].

    ``correct[c]`` is a [runs, n_c] boolean array: which of class c's test images each run got right.
    Test images are drawn with replacement within each class, the same draw for every run.
    """
    runs = correct[0].shape[0]
    out = np.empty((samples, runs, len(correct)))
    for c, hits in enumerate(correct):
        n = hits.shape[1]
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=samples)  # how often each image is drawn
        out[:, :, c] = counts @ hits.T.astype(np.float64) / n
    return out


def interval(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The central percentile interval of bootstrap replicates."""
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def seed_means(per_run: np.ndarray, rng: np.random.Generator, *, skip_nan: bool = False) -> np.ndarray:
    """Per replicate, the mean over seeds drawn with replacement: ``per_run`` [samples, runs] -> [samples]
    (``skip_nan``: over the drawn seeds whose value is defined; NaN where none is)."""
    samples, runs = per_run.shape
    drawn = np.take_along_axis(per_run, rng.integers(runs, size=(samples, runs)), axis=1)
    if not skip_nan:
        return drawn.mean(1)
    return _nan_mean(drawn, axis=1)


def _nan_mean(values: np.ndarray, axis: int | None = None) -> np.ndarray:
    """The mean of the defined (not NaN) values; NaN where none is (without numpy's warning)."""
    count = (~np.isnan(values)).sum(axis)
    return np.where(count > 0, np.nansum(values, axis) / np.maximum(count, 1), np.nan)


def summarize_group(correct: list[np.ndarray], *, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED
                    ) -> dict[str, float]:
    """Mean over runs and 95 % interval of each run statistic, and of each class's accuracy (``class_<c>``)."""
    rng = np.random.default_rng(seed)
    sizes = np.array([hits.shape[1] for hits in correct])
    observed = np.stack([hits.mean(1) for hits in correct], axis=1)  # [runs, classes]
    replicates = bootstrap_class_accuracy(correct, samples=samples, rng=rng)
    row: dict[str, float] = {}
    point, boot = run_statistics(observed, sizes), run_statistics(replicates, sizes)
    for name in RUN_STATISTICS:
        row[name] = float(point[name].mean())
        row[f"{name}_lo"], row[f"{name}_hi"] = interval(seed_means(boot[name], rng))
    for c in range(len(correct)):
        row[f"class_{c}"] = float(observed[:, c].mean())
        row[f"class_{c}_lo"], row[f"class_{c}_hi"] = interval(seed_means(replicates[:, :, c], rng))
    return row


def summarize_vs_dense(correct: list[np.ndarray], dense: list[np.ndarray], keep_ratio: np.ndarray, *,
                       samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> dict[str, float]:
    """Mean over seeds and 95 % interval of :func:`.metrics.change_vs_dense` for runs paired with the dense runs of
    their seeds (``correct`` and ``dense``: per class, [runs, n_c] hits in the same seed order; ``keep_ratio``
    [runs, C]). A replicate draws the same test images for a run and its dense twin, then the seeds."""
    rng = np.random.default_rng(seed)
    runs = correct[0].shape[0]
    both = [np.concatenate([pruned, twin]) for pruned, twin in zip(correct, dense)]
    observed = np.stack([hits.mean(1) for hits in both], axis=1)  # [2 runs, classes]
    replicates = bootstrap_class_accuracy(both, samples=samples, rng=rng)
    point = change_vs_dense(observed[:runs], observed[runs:], keep_ratio)
    boot = change_vs_dense(replicates[:, :runs], replicates[:, runs:], keep_ratio)
    row: dict[str, float] = {}
    for name in VS_DENSE_STATISTICS:
        row[name] = float(_nan_mean(point[name]))
        # a replicate where the dense run got every class equally right has no rank correlation: left out
        drawn = seed_means(boot[name], rng, skip_nan=True)
        drawn = drawn[~np.isnan(drawn)]
        row[f"{name}_lo"], row[f"{name}_hi"] = interval(drawn) if len(drawn) else (float("nan"),) * 2
    return row


def t_interval(values: np.ndarray, confidence: float = CONFIDENCE, *, bounds: tuple[float, float] | None = None
               ) -> tuple[float, float, float]:
    """Mean and Student-t interval of a few independent values (e.g. K scoring runs); NaN bounds for one.
    ``bounds``: the range of the measure, which the interval is cut to (its coverage is kept: the true mean lies
    in the range)."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = scipy_stats.t.ppf((1 + confidence) / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return (mean, *within(mean - half, mean + half, bounds))


def within(lo: float, hi: float, bounds: tuple[float, float] | None) -> tuple[float, float]:
    """An interval cut to the range of its measure (unchanged without ``bounds``)."""
    if bounds is None:
        return float(lo), float(hi)
    return float(max(lo, bounds[0])), float(min(hi, bounds[1]))


def difference_bounds(measure_range: tuple[float, float]) -> tuple[float, float]:
    """The range of a difference of two values of a measure with range ``measure_range``."""
    width = measure_range[1] - measure_range[0]
    return -width, width


def paired_difference(values: np.ndarray, baseline: np.ndarray, replicates: np.ndarray,
                      baseline_replicates: np.ndarray, *, bounds: tuple[float, float] | None = None,
                      alternative: str = "two-sided", confidence: float = CONFIDENCE) -> dict[str, float]:
    """The paired difference ``values - baseline`` (one value per seed, pairs by seed) with both sources of error:
    the seeds' spread (training noise) and the test set's sampling (``replicates``: [B, seeds], the same measures
    on B test sets drawn within each class, the same draw for both runs of a pair).

    The standard error is sqrt(s_d^2 / n + Var_B(mean_d*)), the test statistic mean / se against Student's t with
    n - 1 degrees of freedom (two-sided, or ``alternative="less"``: the difference is below zero), and the interval
    mean +- t se, cut to ``bounds``. With fewer than two seeds, or no variation at all, ``p`` is NaN and ``reason``
    says why. Keys: difference, difference_lo, difference_hi, p, num_seeds, se, test_share (the test set's share of
    the variance), reason."""
    values, baseline = np.asarray(values, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    diff = values - baseline
    n = len(diff)
    row = {"difference": float(diff.mean()) if n else float("nan"), "difference_lo": float("nan"),
           "difference_hi": float("nan"), "p": float("nan"), "num_seeds": n, "se": float("nan"),
           "test_share": float("nan"), "reason": ""}
    if n < 2:
        row["reason"] = f"{n} paired seed{'s' if n != 1 else ''}: a test needs at least 2"
        return row
    resampled_means = (np.asarray(replicates) - np.asarray(baseline_replicates)).mean(1)
    test_var = float(resampled_means.var(ddof=1)) if len(resampled_means) > 1 else 0.0
    seed_var = float(diff.var(ddof=1) / n)
    se = float(np.sqrt(seed_var + test_var))
    row["se"] = se
    if se == 0:
        row["reason"] = "identical in every seed and every resampled test set: nothing to test"
        return row
    row["test_share"] = test_var / (seed_var + test_var)
    t = row["difference"] / se
    df = n - 1
    row["p"] = float(2 * scipy_stats.t.sf(abs(t), df) if alternative == "two-sided" else scipy_stats.t.cdf(t, df))
    half = scipy_stats.t.ppf((1 + confidence) / 2, df) * se
    row["difference_lo"], row["difference_hi"] = within(row["difference"] - half, row["difference"] + half, bounds)
    return row


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (controls the family-wise error rate); NaN entries (no
    test) stay NaN and are not counted in the family."""
    p = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full(p.shape, np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    order = tested[np.argsort(p[tested], kind="stable")]
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p[index]))
        adjusted[index] = running
    return adjusted
