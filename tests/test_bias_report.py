"""The bias chapter's numbers: paired differences by hand, and sentences that follow the tests' verdicts."""

from __future__ import annotations

import matplotlib.container
import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from datadiet_nb import plots, report
from datadiet_nb.results import paired_differences, run_measures
from datadiet_nb.stats import holm, paired_difference

CLASSES = ("a", "b", "c")


TEST_PER_CLASS = 20  # every accuracy below is a multiple of 1/20


def results_of(runs: dict[tuple[str, float, int], list[float]], keep: dict[str, list[float]] | None = None,
               per_class: int = TEST_PER_CLASS) -> pd.DataFrame:
    """A results table with the given class accuracies per (rule, sparsity, seed): of each class's ``per_class``
    test images, the first ones right."""
    rows = []
    for (rule, sparsity, seed), acc in runs.items():
        ratios = (keep or {}).get(rule, [1.0] * len(acc))
        for c, value in enumerate(acc):
            rows.append({"score": rule, "sparsity": sparsity, "seed": seed, "key": f"{rule}-{sparsity}-{seed}",
                         "class": CLASSES[c], "class_index": c, "class_accuracy": value, "keep_ratio": ratios[c],
                         "overall_accuracy": float(np.mean(acc)),
                         "correct": np.arange(per_class) < round(value * per_class)})
    return pd.DataFrame(rows)


RUNS = {
    ("random", 0.5, 0): [0.9, 0.7, 0.8], ("random", 0.5, 1): [0.85, 0.75, 0.8], ("random", 0.5, 2): [0.9, 0.6, 0.8],
    ("el2n", 0.5, 0): [0.9, 0.8, 0.8], ("el2n", 0.5, 1): [0.85, 0.8, 0.8], ("el2n", 0.5, 3): [0.9, 0.9, 0.9],
}


def test_paired_differences_pair_runs_of_the_same_seed_by_hand():
    """On a very large test set (the test set's share of the error vanishes) the test is the paired t-test over
    seeds; the interval is the t interval."""
    table = paired_differences(results_of(RUNS, per_class=20_000), [("el2n", "random")]).set_index("measure")
    seeds = (0, 1)  # seed 2 has no el2n run, seed 3 no random run
    for measure, of in (("std", np.std), ("worst", np.min)):
        mine = np.array([of(RUNS[("el2n", 0.5, s)]) for s in seeds])
        theirs = np.array([of(RUNS[("random", 0.5, s)]) for s in seeds])
        row = table.loc[measure]
        assert row["difference"] == pytest.approx((mine - theirs).mean())
        half = scipy_stats.t.ppf(0.975, 1) * (mine - theirs).std(ddof=1) / np.sqrt(2)
        assert (row["difference_lo"], row["difference_hi"]) == pytest.approx(
            (max(row["difference"] - half, -1 if measure == "worst" else -0.5), row["difference"] + half), rel=0.02)
        assert row["p"] == pytest.approx(scipy_stats.ttest_rel(mine, theirs).pvalue, rel=0.02)
        assert row["test_share"] < 0.03 and row["num_seeds"] == 2 and row["sparsity"] == 0.5
    assert table["p_adjusted"].tolist() == pytest.approx(holm(table["p"].to_numpy()).tolist())
    assert paired_differences(results_of(RUNS), [("ccs", "random")]).empty  # a rule that did not run


def test_a_difference_of_one_test_image_in_every_seed_is_not_significant():
    """Each seed's pruned run gets exactly one more test image of class c right than the baseline: the seeds agree
    perfectly (a paired t-test over seeds alone has no spread at all), but one image of 20 is test-set noise."""
    runs = {}
    for seed in range(5):
        runs[("random", 0.5, seed)] = [0.9, 0.8, 0.7]
        runs[("grand", 0.5, seed)] = [0.9, 0.8, 0.75]
    row = paired_differences(results_of(runs), [("grand", "random")], measures=["worst"]).iloc[0]
    assert row["difference"] == pytest.approx(0.05) and row["test_share"] == pytest.approx(1.0)
    assert row["p"] > 0.05 and row["difference_lo"] < 0 < row["difference_hi"]


def test_one_seed_has_no_test_and_says_why():
    one = {key: acc for key, acc in RUNS.items() if key[2] == 0}
    row = paired_differences(results_of(one), [("el2n", "random")], measures=["worst"]).iloc[0]
    assert np.isnan(row["p"]) and row["reason"] == "1 paired seed: a test needs at least 2"
    assert report.difference_text(row) == "+10.0 points (1 paired seed: a test needs at least 2)"


def test_the_paired_difference_by_hand_and_its_interval_stays_in_range():
    values, baseline = np.array([0.9, 0.1]), np.array([0.0, 0.0])
    replicates = np.array([[0.9, 0.1], [0.8, 0.2], [1.0, 0.0]])
    baseline_replicates = np.zeros((3, 2))
    row = paired_difference(values, baseline, replicates, baseline_replicates, bounds=(-1.0, 1.0))
    seed_var = np.var([0.9, 0.1], ddof=1) / 2
    test_var = np.var([0.5, 0.5, 0.5], ddof=1)
    se = np.sqrt(seed_var + test_var)
    assert row["se"] == pytest.approx(se) and row["test_share"] == pytest.approx(0.0)
    assert row["p"] == pytest.approx(2 * scipy_stats.t.sf(0.5 / se, 1))
    assert (row["difference_lo"], row["difference_hi"]) == (-1.0, 1.0)  # the t interval is wider: cut to range
    less = paired_difference(values, baseline, replicates, baseline_replicates, alternative="less")
    assert less["p"] == pytest.approx(scipy_stats.t.cdf(0.5 / se, 1))


def test_holm_by_hand():
    adjusted = holm([0.01, 0.04, 0.03, float("nan")])
    assert adjusted[:3].tolist() == pytest.approx([0.03, 0.06, 0.06]) and np.isnan(adjusted[3])
    assert holm([0.5, 0.9]).tolist() == [1.0, 1.0]


def test_run_measures_are_the_spread_of_each_runs_class_accuracies():
    measures = run_measures(results_of(RUNS)).set_index("key").loc["el2n-0.5-0"]
    assert measures["std"] == pytest.approx(np.std([0.9, 0.8, 0.8]))
    assert (measures["worst"], measures["gap"]) == pytest.approx((0.8, 0.1))


def differences_with(rule: str, baseline: str, measure: str, difference: float, p: float) -> pd.DataFrame:
    return pd.DataFrame([{"rule": rule, "baseline": baseline, "sparsity": 0.5, "measure": measure,
                          "difference": difference, "difference_lo": difference - 0.01,
                          "difference_hi": difference + 0.01, "p": p, "num_seeds": 3}])


SUMMARY = pd.DataFrame([{"score": "el2n", "sparsity": 0.5, "keep_error_spearman": 0.8, "keep_error_spearman_lo": 0.5,
                         "keep_error_spearman_hi": 0.95, "std_below_dense_p": 0.2,
                         "std_below_dense_p_adjusted": 0.2}])


@pytest.mark.parametrize("difference, p, says", [
    (-0.02, 0.01, "which examples EL2N keeps lowers the spread beyond how many"),
    (0.02, 0.01, "which examples EL2N keeps raises the spread beyond how many"),
    (-0.02, 0.30, "the data do not show that which examples EL2N keeps matters"),
    (-0.02, float("nan"), "the data do not show that which examples EL2N keeps matters"),
])
def test_the_which_examples_sentence_follows_the_paired_test(difference, p, says):
    numbers = report.bias_numbers(SUMMARY, differences_with("el2n", "el2n-matched", "std", difference, p),
                                  {"el2n": "EL2N", "el2n-matched": "EL2N matched"})
    assert numbers["which_verdict"].startswith(says)
    assert numbers["which_std"].startswith(f"{100 * difference:+.1f} points")


def test_the_poster_claim_is_supported_only_with_a_significant_paired_test():
    labels = {"el2n": "EL2N"}
    empty = differences_with("el2n", "random", "std", 0.0, 0.5)
    assert report.bias_numbers(SUMMARY, empty, labels)["poster_claim"].startswith("does not support")
    lower = SUMMARY.assign(std_below_dense_p=0.01, std_below_dense_p_adjusted=0.01)
    assert report.bias_numbers(lower, empty, labels)["poster_claim"].startswith("supports the claim of the poster")
    assert report.bias_numbers(SUMMARY, empty, labels)["el2n_keep_error_rho"] == "0.80 (95 % CI 0.50 to 0.95)"
    assert report.bias_numbers(SUMMARY, empty, labels)["drop_vs_random_worst"] == "n/a (not run)"
    assert ";" not in report.bias_numbers(lower, empty, labels)["poster_claim"]  # no dense pairing, no clause


@pytest.mark.parametrize("difference, p, says", [
    (-0.12, 0.01, "but its worst class falls too, by -12.0 points"),
    (0.05, 0.01, "and its worst class rises, by +5.0 points"),
    (-0.12, 0.20, "its worst class is not shown to change: -12.0 points"),
])
def test_the_poster_claim_says_whether_the_worst_class_fell_with_the_spread(difference, p, says):
    lower = SUMMARY.assign(std_below_dense_p=0.01, std_below_dense_p_adjusted=0.01)
    claim = report.bias_numbers(lower, differences_with("el2n", "dense", "worst", difference, p), {"el2n": "EL2N"})
    assert claim["poster_claim"].startswith("supports the claim of the poster") and f"; {says}" in claim["poster_claim"]
    assert claim["poster_claim"].endswith("levelling down") == (says.startswith("but"))


def test_bias_pairs_compare_with_random_and_the_matched_twin():
    assert report.bias_pairs(["el2n", "random", "el2n-matched", "drop"]) == [
        ("el2n", "random"), ("el2n-matched", "random"), ("drop", "random"), ("el2n", "el2n-matched"),
        ("el2n", "dense"), ("random", "dense"), ("el2n-matched", "dense"), ("drop", "dense")]


def test_bias_figures_have_a_panel_per_measure_and_per_rule():
    rows = []
    for rule in ("dense", "el2n", "random"):
        for sparsity in ((0.0,) if rule == "dense" else (0.3, 0.5)):
            row = {"score": rule, "sparsity": sparsity, "num_seeds": 2}
            for name in plots.BIAS_MEASURES:
                row.update({name: 0.5, f"{name}_lo": 0.4, f"{name}_hi": 0.6})
            rows.append(row)
    summary = pd.DataFrame(rows)
    fig = plots.bias_panels(summary)
    # every value alike: the mean of the worst 10 % is the worst class, shown once
    assert sum(ax.get_visible() for ax in fig.axes) == len(plots.BIAS_MEASURES) - 1
    assert "Mean of the worst 10 % of classes" not in [ax.get_title() for ax in fig.axes]
    distinct = summary.assign(worst_10pct_accuracy=0.55)
    assert sum(ax.get_visible() for ax in plots.bias_panels(distinct).axes) == len(plots.BIAS_MEASURES)
    assert report.bias_table(distinct).shape == (5, len(plots.BIAS_MEASURES) + 1)
    # one pruned sparsity: the panels against dense have one point per rule, each drawn with its interval
    fig = plots.bias_panels(summary[summary["sparsity"] != 0.3])
    relative = fig.axes[list(plots.BIAS_MEASURES).index("mean_abs_change")]
    bars = [c for c in relative.containers if isinstance(c, matplotlib.container.ErrorbarContainer)]
    assert len(bars) == 2 and all(len(bar.lines[2][0].get_segments()) == 1 for bar in bars)
    [(bottom, top)] = [segment[:, 1] for segment in bars[0].lines[2][0].get_segments()]
    assert (bottom, top) == pytest.approx((0.4, 0.6))
    assert bars[0].lines[0].get_xdata()[0] != bars[1].lines[0].get_xdata()[0]  # set apart
    runs = {("dense", 0.0, 0): [0.9, 0.7, 0.8], ("el2n", 0.5, 0): [0.9, 0.8, 0.8], ("random", 0.5, 0): [0.8] * 3}
    fig = plots.keep_ratio_vs_dense_error(results_of(runs, keep={"el2n": [0.3, 0.9, 0.5]}), summary, 0.5)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title().split(":")[0] for ax in visible] == ["EL2N", "Random"]
    assert visible[0].get_title() == "EL2N: rho 0.50 [0.40, 0.60]"
    undefined = summary.assign(keep_error_spearman=np.where(summary["score"] == "random", np.nan, 0.5))
    fig = plots.keep_ratio_vs_dense_error(results_of(runs, keep={"el2n": [0.3, 0.9, 0.5]}), undefined, 0.5)
    assert fig.axes[1].get_title() == "Random: rho undefined (keep ratios flat)"
    assert list(visible[0].collections[0].get_offsets()[:, 1]) == [0.3, 0.9, 0.5]
    assert report.bias_table(summary).shape == (5, len(plots.BIAS_MEASURES))  # no duplicate column


def test_the_differences_table_has_a_row_per_comparison_and_a_column_per_sparsity():
    differences = paired_differences(results_of(RUNS), [("el2n", "random")])
    table = report.differences_table(differences, {"el2n": "EL2N", "random": "Random"})
    assert table.index.tolist() == [("EL2N", "Random", "std"), ("EL2N", "Random", "worst")]
    assert table.columns.tolist() == [0.5]
    row = differences.set_index("measure").loc["std"]
    assert table.loc[("EL2N", "Random", "std"), 0.5] == (
        f"{row['difference']:.3f} [{row['difference_lo']:.3f}, {row['difference_hi']:.3f}], p = {row['p_adjusted']:.3f}")
    assert row["p_adjusted"] == pytest.approx(min(1.0, 2 * differences["p"].min()) if row["p"] == differences[
        "p"].min() else max(differences["p"].max(), 2 * differences["p"].min()))  # Holm over the table's 2 tests
    tiny = report.differences_table(differences.assign(p=1e-5, p_adjusted=2e-5))
    assert tiny.iloc[0, 0].endswith(", p < 0.001")


def test_the_best_and_worst_classes_are_drawn_only_where_the_validation_split_can_rank_them():
    spread = pd.Series([0.99, 0.98, 0.97, 0.6, 0.5, 0.55], index=list("abcdef"))
    assert report.ranking_note(spread, np.full(6, 100)) is None
    close = pd.Series([1.0, 1.0, 0.89, 1.0, 0.89, 1.0], index=list("abcdef"))  # one image of 9 apart
    note = report.ranking_note(close, np.full(6, 9))
    assert note.startswith("The best and worst classes are not drawn: the validation split (9 to 9 images per "
                           "class) cannot rank the classes")


def test_the_results_page_states_the_scale_of_the_study():
    from datadiet_nb import presets

    text = report.scale_text(presets.get("digits"), np.array([0, 0, 0, 1, 1]), np.array([0, 0, 1, 1]), 5)
    assert text == ("smallcnn (width 4) on digits: training images 2 to 3 per class (5 in all), test images 2 per "
                    "class (4 in all), 5 seeds")
