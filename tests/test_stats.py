"""Intervals, the noise-corrected spread and the paired test, against hand computations and simulations."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from datadiet_nb import stats
from datadiet_nb.results import class_summary, summarize


def frame(hits: dict[tuple[str, float, int], list[np.ndarray]]) -> pd.DataFrame:
    """A results table (as load_results makes it) from per-run, per-class hit vectors."""
    rows = []
    for (score, sparsity, seed), per_class in hits.items():
        acc = np.array([h.mean() for h in per_class])
        overall = np.concatenate(per_class).mean()
        for c, h in enumerate(per_class):
            rows.append({"preset": "t", "dataset": "t", "model": "m", "score": score, "sparsity": sparsity,
                         "offset": 0.0, "seed": seed, "class": f"c{c}", "class_index": c, "class_accuracy": acc[c],
                         "keep_ratio": 1.0, "overall_accuracy": overall, "class_std": acc.std(),
                         "key": f"{score}-{sparsity}-{seed}", "correct": h})
    return pd.DataFrame(rows)


def hits_with(accuracies, n, rng):
    return [rng.random(n) < p for p in accuracies]


def test_corrected_std_by_hand():
    acc, sizes = np.array([0.9, 0.5, 0.7]), np.array([100, 100, 50])
    noise = (0.9 * 0.1 / 100 + 0.5 * 0.5 / 100 + 0.7 * 0.3 / 50) / 3
    assert stats.corrected_std(acc, sizes) == pytest.approx(np.sqrt(acc.var() - noise))
    # equal accuracies: the observed spread is all noise, and the correction does not go below zero
    assert stats.corrected_std(np.array([0.5, 0.52]), np.array([10, 10])) == 0.0


def test_summary_means_spread_worst_class_and_seed_count_by_hand():
    rng = np.random.default_rng(0)
    hits = {("dense", 0.0, s): hits_with([0.9, 0.6, 0.8], 200, rng) for s in (0, 1, 2)}
    hits |= {("el2n", 0.5, s): hits_with([0.85, 0.75, 0.8], 200, rng) for s in (0, 1, 2)}
    table = summarize(frame(hits), samples=200).set_index("score")
    for score in ("dense", "el2n"):
        runs = [np.array([h.mean() for h in hits[(score, 0.5 if score == "el2n" else 0.0, s)]]) for s in (0, 1, 2)]
        row = table.loc[score]
        assert row["overall_accuracy"] == pytest.approx(np.mean([r.mean() for r in runs]))  # equal class sizes
        assert row["class_std"] == pytest.approx(np.mean([r.std() for r in runs]))
        assert row["class_std_corrected"] == pytest.approx(np.mean([stats.corrected_std(r, [200] * 3) for r in runs]))
        assert row["worst_class_accuracy"] == pytest.approx(np.mean([r.min() for r in runs]))
        assert row["num_seeds"] == 3 and row["worst_class"] == "c1"
        for name in stats.RUN_STATISTICS:
            assert row[f"{name}_lo"] <= row[name] <= row[f"{name}_hi"]
    dense_std = [np.array([h.mean() for h in hits[("dense", 0.0, s)]]).std() for s in (0, 1, 2)]
    el2n_std = [np.array([h.mean() for h in hits[("el2n", 0.5, s)]]).std() for s in (0, 1, 2)]
    seeds_alone = scipy_stats.ttest_rel(el2n_std, dense_std, alternative="less").pvalue
    # the test counts the test set's sampling error too: never more confident than the seeds alone
    assert seeds_alone <= table.loc["el2n", "std_below_dense_p"] < 0.05, "a clearly smaller spread is detected"
    assert table.loc["el2n", "std_below_dense_p_adjusted"] == table.loc["el2n", "std_below_dense_p"]  # one test
    assert np.isnan(table.loc["dense", "std_below_dense_p"])


def test_the_paired_test_pairs_runs_by_seed():
    """Dense spread varies a lot by seed; each pruned run is its seed's dense spread minus a little:
    paired, that is significant; unpaired (shuffled seeds) it would not be."""
    dense = np.array([0.05, 0.15, 0.30, 0.10])
    pruned = dense - np.array([0.010, 0.012, 0.009, 0.011])
    assert below_p(pruned, dense) < 0.001
    assert below_p(pruned[::-1], dense) > 0.05
    assert np.isnan(below_p(pruned[:1], dense[:1]))


def below_p(pruned, dense) -> float:
    """The one-sided paired test of ``pruned`` below ``dense`` with no test-set error (every resample the same)."""
    pruned, dense = np.asarray(pruned, dtype=float), np.asarray(dense, dtype=float)
    return stats.paired_difference(pruned, dense, np.tile(pruned, (10, 1)), np.tile(dense, (10, 1)),
                                   alternative="less")["p"]


def test_a_perfect_model_has_a_zero_width_interval_and_per_class_rows():
    hits = {("dense", 0.0, s): [np.ones(50, bool), np.ones(30, bool)] for s in (0, 1)}
    row = summarize(frame(hits), samples=100).iloc[0]
    assert row["overall_accuracy_lo"] == row["overall_accuracy_hi"] == 1.0 and row["class_std_hi"] == 0.0
    classes = class_summary(frame(hits), samples=100)
    assert list(classes["class"]) == ["c0", "c1"] and (classes["class_accuracy_lo"] == 1.0).all()


def test_the_interval_covers_the_truth_about_95_percent_of_the_time():
    """Simulated studies as the real ones are: one test set shared by every run, each image with its own
    difficulty (drawn around its class's accuracy), each seed's model a little better or worse. The 95 %
    interval of the overall accuracy should contain the expected accuracy in roughly 95 % of studies."""
    rng = np.random.default_rng(1)
    truth = np.array([0.9, 0.7, 0.5, 0.8])
    covered, trials = 0, 150
    for trial in range(trials):
        difficulty = [rng.beta(2 * t, 2 * (1 - t), size=150) for t in truth]  # mean t per class
        hits = {}
        for seed in range(5):
            shift = rng.normal(0, 0.02)
            hits[("dense", 0.0, seed)] = [rng.random(150) < np.clip(d + shift, 0, 1) for d in difficulty]
        row = summarize(frame(hits), samples=300).iloc[0]
        covered += row["overall_accuracy_lo"] <= truth.mean() <= row["overall_accuracy_hi"]
    assert 0.85 <= covered / trials <= 0.99, covered / trials


def test_bootstrap_is_reproducible():
    rng = np.random.default_rng(2)
    hits = {("dense", 0.0, s): hits_with([0.6, 0.7], 40, rng) for s in (0, 1)}
    assert summarize(frame(hits), samples=50).equals(summarize(frame(hits), samples=50))


def test_t_interval_by_hand():
    """Mean +- t_{0.975, n-1} s / sqrt(n) with the sample std (ddof 1): for 1, 2, 6 the mean is 3, s = sqrt(7)."""
    mean, lo, hi = stats.t_interval([1, 2, 6])
    half = scipy_stats.t.ppf(0.975, 2) * np.sqrt(7) / np.sqrt(3)
    assert (mean, lo, hi) == pytest.approx((3.0, 3.0 - half, 3.0 + half), rel=1e-12)
    assert stats.t_interval([1, 2, 6], confidence=0.5)[2] == pytest.approx(3.0 + scipy_stats.t.ppf(0.75, 2) * np.sqrt(7 / 3))
    mean, lo, hi = stats.t_interval([0.25])
    assert mean == 0.25 and np.isnan(lo) and np.isnan(hi)


def test_class_summary_rows_by_hand_and_its_bootstrap_size_is_honoured():
    rng = np.random.default_rng(3)
    hits = {("el2n", 0.5, s): hits_with([0.9, 0.6, 0.75], 60, rng) for s in (0, 1)}
    hits |= {("dense", 0.0, s): hits_with([0.95, 0.7, 0.8], 60, rng) for s in (0, 1)}
    classes = class_summary(frame(hits), samples=200)
    assert classes.index.equals(pd.RangeIndex(6))  # dense rows first (sparsity 0), classes in order
    assert list(zip(classes["score"], classes["class"])) == [(s, f"c{c}") for s in ("dense", "el2n") for c in range(3)]
    for _, row in classes.iterrows():
        sparsity = 0.0 if row["score"] == "dense" else 0.5
        runs = [hits[(row["score"], sparsity, s)][row["class_index"]].mean() for s in (0, 1)]
        assert row["class_accuracy"] == pytest.approx(np.mean(runs))
        assert row["class_accuracy_lo"] < row["class_accuracy"] < row["class_accuracy_hi"]
    one = class_summary(frame(hits), samples=1)  # a single bootstrap replicate: its interval has no width
    assert (one["class_accuracy_lo"] == one["class_accuracy_hi"]).all()


def test_the_paired_test_is_undefined_for_one_pair_or_a_constant_difference():
    dense = np.array([0.5, 0.25, 0.75])
    assert np.isnan(below_p(dense - 0.125, dense))  # the same drop (exact in binary) for every seed
    assert np.isnan(below_p([0.1], [0.2]))
    assert 0 < below_p(dense - [0.125, 0.25, 0.1875], dense) < 0.05


def test_summarize_without_a_dense_run_has_no_p_values_and_exactly_its_columns():
    rng = np.random.default_rng(4)
    hits = {("el2n", 0.5, s): hits_with([0.8, 0.6], 40, rng) for s in (0, 1)}
    table = summarize(frame(hits), samples=1)
    assert table.index.equals(pd.RangeIndex(1)) and np.isnan(table.loc[0, "std_below_dense_p"])
    interval_columns = [f"{n}{suffix}" for n in stats.RUN_STATISTICS + stats.VS_DENSE_STATISTICS
                        for suffix in ("", "_lo", "_hi")]
    assert sorted(table.columns) == sorted(["score", "sparsity", *interval_columns, "worst_class",
                                            "std_below_dense_p", "std_below_dense_p_adjusted", "num_seeds"])
    for name in stats.RUN_STATISTICS:  # one bootstrap replicate: the requested size is used (zero width)
        assert table.loc[0, f"{name}_lo"] == table.loc[0, f"{name}_hi"]
    hits |= {("dense", 0.0, s): hits_with([0.9, 0.7], 40, rng) for s in (0, 1)}  # recorded after the pruned runs
    table = summarize(frame(hits), samples=1)
    assert list(table["score"]) == ["dense", "el2n"] and table.index.equals(pd.RangeIndex(2))


def test_the_percentile_interval_by_hand():
    values = np.arange(1001.0)  # the q-th percentile of 0..1000 is 10 q
    assert stats.interval(values) == pytest.approx((25.0, 975.0), abs=1e-9)
    assert stats.interval(values, confidence=0.5) == pytest.approx((250.0, 750.0), abs=1e-9)


def test_change_vs_dense_is_paired_by_seed_with_intervals():
    rng = np.random.default_rng(7)
    hits = {("dense", 0.0, s): hits_with([0.9, 0.6, 0.8], 300, rng) for s in (0, 1, 2)}
    hits |= {("el2n", 0.5, s): hits_with([0.85, 0.75, 0.8], 300, rng) for s in (0, 1, 2)}
    results = frame(hits)
    keep = {0: 0.3, 1: 0.9, 2: 0.5}  # most kept of the class the dense model gets most wrong (c1)
    results.loc[results["score"] == "el2n", "keep_ratio"] = results["class_index"].map(keep)
    row = summarize(results, samples=300).set_index("score").loc["el2n"]
    acc = {key: np.array([h.mean() for h in per_class]) for key, per_class in hits.items()}
    change = [np.abs(acc[("el2n", 0.5, s)] - acc[("dense", 0.0, s)]).mean() for s in (0, 1, 2)]
    assert row["mean_abs_change"] == pytest.approx(np.mean(change))
    assert row["mean_abs_change_lo"] <= row["mean_abs_change"] <= row["mean_abs_change_hi"]
    rho = [scipy_stats.spearmanr([0.3, 0.9, 0.5], 1 - acc[("dense", 0.0, s)]).statistic for s in (0, 1, 2)]
    assert row["keep_error_spearman"] == pytest.approx(np.mean(rho))
    assert row["keep_error_spearman_lo"] <= row["keep_error_spearman"] <= row["keep_error_spearman_hi"]
    dense_row = summarize(results, samples=10).set_index("score").loc["dense"]
    assert np.isnan(dense_row["mean_abs_change"]) and np.isnan(dense_row["keep_error_spearman_hi"])
