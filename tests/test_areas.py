"""One number across the sparsity grid: the normalised area under a rule's worst-class and class-std curves,
its bootstrap interval and the paired tests between rules, by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from datadiet_nb.stats import holm
from datadiet_nb.results import area_differences, area_per_seed, normalised_area, summarize_areas

N = 10  # test images per class (two classes)
# (rule, sparsity) -> per seed, the hits of each class (the first k of its N test images right)
HITS = {("dense", 0.0): [(8, 10), (9, 9)],
        ("el2n", 0.4): [(6, 10), (7, 9)], ("el2n", 0.8): [(2, 9), (3, 8)],
        ("random", 0.4): [(8, 9), (8, 9)], ("random", 0.8): [(6, 8), (7, 8)]}


def made_results(hits: dict = HITS) -> pd.DataFrame:
    rows = []
    for (rule, sparsity), per_seed in hits.items():
        for seed, per_class in enumerate(per_seed):
            for index, k in enumerate(per_class):
                rows.append({"score": rule, "sparsity": sparsity, "seed": seed, "key": f"{rule}{sparsity}{seed}",
                             "class": f"c{index}", "class_index": index, "class_accuracy": k / N,
                             "keep_ratio": 1.0, "overall_accuracy": sum(per_class) / (2 * N),
                             "correct": np.arange(N) < k})
    return pd.DataFrame(rows)


def test_the_normalised_area_is_the_trapezoid_over_the_range():
    assert normalised_area([0.0, 0.4, 0.8], [0.8, 0.6, 0.2]) == pytest.approx(((0.8 + 0.6) / 2 * 0.4 +
                                                                               (0.6 + 0.2) / 2 * 0.4) / 0.8)
    assert normalised_area([0.0, 0.5], [[1.0, 1.0], [0.0, 1.0]], axis=1).tolist() == [1.0, 0.5]
    assert normalised_area([0.0, 0.1, 0.9], [0.3, 0.3, 0.3]) == pytest.approx(0.3)  # a flat curve: its height


def test_each_seeds_area_starts_from_its_own_dense_run():
    worst = area_per_seed(made_results(), "el2n", "worst")
    by_hand = [normalised_area([0, 0.4, 0.8], [0.8, 0.6, 0.2]), normalised_area([0, 0.4, 0.8], [0.9, 0.7, 0.3])]
    assert worst.tolist() == pytest.approx(by_hand)
    std = area_per_seed(made_results(), "random", "std")
    assert std.tolist() == pytest.approx([normalised_area([0, 0.4, 0.8], [0.1, 0.05, 0.1]),
                                          normalised_area([0, 0.4, 0.8], [0.0, 0.05, 0.05])])


def test_the_summary_has_one_row_per_rule_with_an_interval_around_the_mean():
    table = summarize_areas(made_results(), samples=300).set_index("score")
    assert list(table.index) == ["el2n", "random"] and table["sparsities"].tolist() == [3, 3]
    assert table.loc["el2n", "worst_area"] == pytest.approx(np.mean([0.55, 0.65]))
    for rule in table.index:
        for measure in ("worst", "std"):
            assert table.loc[rule, f"{measure}_area_lo"] <= table.loc[rule, f"{measure}_area"] <= \
                   table.loc[rule, f"{measure}_area_hi"]
    wide = table.loc["el2n", "worst_area_hi"] - table.loc["el2n", "worst_area_lo"]
    more = made_results({key: hits for key, hits in HITS.items()})
    more["correct"] = more["correct"].map(lambda hits: np.repeat(hits, 10))  # 10x the test images, same accuracies
    narrow = summarize_areas(more, samples=300).set_index("score")
    assert narrow.loc["el2n", "worst_area"] == pytest.approx(table.loc["el2n", "worst_area"])
    assert narrow.loc["el2n", "worst_area_hi"] - narrow.loc["el2n", "worst_area_lo"] < wide / 2  # test-set noise


def test_paired_differences_of_areas_are_t_tests_over_seeds():
    """On a test set so large that its sampling error vanishes, the test is the paired t-test over seeds."""
    large = made_results()
    large["correct"] = large["correct"].map(lambda hits: np.repeat(hits, 2000))
    table = area_differences(large, [("el2n", "random"), ("el2n", "dense"), ("random", "random")])
    assert set(table["baseline"]) == {"random"} and set(table["rule"]) == {"el2n"}  # not dense (every curve's
    # start), not a rule against itself
    row = table[table["measure"] == "worst"].iloc[0]
    mine = area_per_seed(made_results(), "el2n", "worst").to_numpy()
    theirs = area_per_seed(made_results(), "random", "worst").to_numpy()
    assert row["difference"] == pytest.approx((mine - theirs).mean())
    assert row["p"] == pytest.approx(scipy_stats.ttest_rel(mine, theirs).pvalue, rel=0.05) and row["num_seeds"] == 2
    assert table["p_adjusted"].tolist() == pytest.approx(holm(table["p"].to_numpy()).tolist())
    noisy = area_differences(made_results(), [("el2n", "random")]).query("measure == 'worst'").iloc[0]
    assert noisy["p"] > row["p"] and noisy["test_share"] > 0.3  # 10 test images per class: the test set counts


def test_a_rule_missing_a_sparsity_is_compared_on_the_common_grid_and_named():
    """el2n's run at 0.8 failed: its difference from random is taken over 0 and 0.4 for both (not el2n's short
    range against random's full one), and its own area row names the missing point instead of a shorter area."""
    hits = {key: value for key, value in HITS.items() if key != ("el2n", 0.8)}
    results = made_results(hits)
    row = area_differences(results, [("el2n", "random")]).query("measure == 'worst'").iloc[0]
    mine = [normalised_area([0, 0.4], [0.8, 0.6]), normalised_area([0, 0.4], [0.9, 0.7])]
    theirs = [normalised_area([0, 0.4], [0.8, 0.8]), normalised_area([0, 0.4], [0.9, 0.8])]
    assert row["difference"] == pytest.approx(np.mean(np.subtract(mine, theirs)))  # -0.075, not -0.025
    areas = summarize_areas(results, samples=50).set_index("score")
    assert areas.loc["el2n", "missing"] == "0.8" and areas.loc["random", "missing"] == ""
    assert (areas["sparsities"] == 2).all()  # every rule over the grid all of them ran
    assert areas.loc["random", "worst_area"] == pytest.approx(np.mean(theirs))


def test_the_dense_run_has_no_area_to_compare():
    table = area_differences(made_results(), [("dense", "random"), ("random", "dense")])
    assert table.empty
