"""The regime chapter's numbers by hand: the crossing of keep-hard and keep-easy, its interval, the paired tests
per size, and the sentences worded from them."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from datadiet_nb import presets, regime
from datadiet_nb.regime import crossing, crossing_point, crossing_text, side_text
from datadiet_nb.stats import holm

PER_CLASS_TEST = 10  # two classes of 10 test images
# (size, rule) -> per seed, how many test images of each class the run got right (the first k of the class)
HITS = {
    (10, "el2n"): [(5, 5), (5, 6), (6, 7)], (10, "el2n-easy"): [(7, 7), (7, 7), (8, 7)],  # 10, 11, 13 vs 14, 14, 15
    (100, "el2n"): [(9, 9), (9, 8), (9, 9)], (100, "el2n-easy"): [(6, 6), (7, 6), (6, 6)],  # 18, 17, 18 vs 12, 13, 12
    (10, "dense"): [(8, 8)] * 3, (100, "dense"): [(10, 9)] * 3,
}
KEEP = {"el2n": (0.3, 0.7), "el2n-easy": (0.7, 0.3), "random": (0.5, 0.5), "dense": (1.0, 1.0)}


def fake_results(hits: dict = HITS, repeat: int = 1) -> pd.DataFrame:
    """What load_results gives for these runs: one row per (run, class); ``repeat``: each test image that many
    times (the same accuracies on a larger test set)."""
    rows = []
    for (size, rule), per_seed in hits.items():
        for seed, per_class in enumerate(per_seed):
            key = f"{rule}-{size}-{seed}"
            class_acc = [k / PER_CLASS_TEST for k in per_class]
            for index, k in enumerate(per_class):
                rows.append({"train_size": float(size), "score": rule, "sparsity": 0.0 if rule == "dense" else 0.5,
                             "seed": seed, "key": key, "class": f"c{index}", "class_index": index,
                             "class_accuracy": class_acc[index], "keep_ratio": KEEP[rule][index],
                             "overall_accuracy": sum(per_class) / (2 * PER_CLASS_TEST),
                             "class_std": float(np.std(class_acc)),
                             "correct": np.repeat(np.arange(PER_CLASS_TEST) < k, repeat)})
    return pd.DataFrame(rows)


def test_crossing_point_interpolates_in_log_size():
    assert crossing_point([10, 100], [-0.15, 0.8 / 3]) == pytest.approx(10 ** (1 + 0.15 / (0.15 + 0.8 / 3)))
    assert crossing_point([100, 10], [0.8 / 3, -0.15]) == pytest.approx(22.909, abs=0.001)  # any order of sizes
    assert crossing_point([10, 100, 1000], [0.1, 0.1, -0.1]) == pytest.approx(10 ** 2.5)
    assert crossing_point([10, 100, 1000], [-0.1, 0.1, -0.1]) == pytest.approx(10 ** 1.5)  # the first from below
    assert crossing_point([10, 100, 1000], [-0.1, 0.0, 0.2]) == pytest.approx(100)  # tied at a size in between
    assert math.isnan(crossing_point([10, 100, 1000], [0.1, 0.2, 0.05]))  # no sign change
    assert regime.sign_changes([-0.1, 0.1, -0.1]) == 2 and regime.sign_changes([0.1, 0.2]) == 0
    assert crossing_point([10, 100], [-0.15, 0.8 / 3], log=False) == pytest.approx(10 + 90 * 0.15 / (0.15 + 0.8 / 3))
    assert regime.crossing_bracket([10, 40, 100], [-0.1, -0.05, 0.1]) == (40, 100)


def test_a_tie_is_not_a_crossing():
    """A gap of exactly zero (likely: accuracies are multiples of 1/n) is on neither side."""
    assert math.isnan(crossing_point([10, 100, 1000], [0.05, 0.0, 0.04]))  # a touch, not a crossing
    assert regime.sign_changes([0.05, 0.0, 0.04]) == 0
    assert regime.sign_changes([-0.05, 0.0, 0.04]) == 1  # through zero: one crossing, not two
    assert regime.crossing_bracket([10, 100, 1000], [-0.05, 0.0, 0.04]) == (10, 1000)
    assert math.isnan(crossing_point([10, 100], [0.0, 0.0]))


def test_crossing_gaps_are_the_paired_accuracy_differences_by_hand():
    found = crossing(fake_results(), samples=400)
    assert found["sizes"] == [10, 100] and found["num_seeds"] == 3
    assert found["gaps"] == pytest.approx([np.mean([-4, -3, -2]) / 20, np.mean([6, 4, 6]) / 20])
    assert found["point"] == pytest.approx(10 ** (1 + 0.15 / (0.15 + 0.8 / 3)))
    assert 10 <= found["lo"] <= found["point"] <= found["hi"] <= 100
    assert 0.9 <= found["fraction_crossing"] <= 1.0  # the gaps differ in sign in nearly every resample
    again = crossing(fake_results(), samples=400)
    assert (again["lo"], again["hi"]) == (found["lo"], found["hi"])  # seeded


def test_curves_that_do_not_cross_say_so_and_who_is_ahead():
    never = {**HITS, (10, "el2n"): [(9, 9), (9, 9), (9, 8)]}  # keep-hard ahead at both sizes
    found = crossing(fake_results(never), samples=200)
    assert math.isnan(found["point"]) and found["sign_changes"] == 0
    text = crossing_text(found, {})
    assert text.startswith("do not cross between 10 and 100 images per class: el2n is ahead at every size")


def test_a_study_without_the_easy_rule_is_told_what_to_add():
    from datadiet_nb.errors import UserError

    without = {key: hits for key, hits in HITS.items() if key[1] != "el2n-easy"}
    with pytest.raises(UserError, match="hold no runs of el2n-easy: add it to the preset"):
        crossing(fake_results(without))


def test_differences_per_size_are_paired_t_tests_of_the_runs_accuracies():
    results = fake_results(repeat=2000)  # a test set so large that its sampling error vanishes: the t-test
    differences = regime.differences_by_size(results, [("el2n", "el2n-easy")])
    row = differences.query("train_size == 10 and measure == 'accuracy'").iloc[0]
    hard, easy = np.array([10, 11, 13]) / 20, np.array([14, 14, 15]) / 20
    assert row["difference"] == pytest.approx(-0.15)
    assert row["p"] == pytest.approx(scipy_stats.ttest_rel(hard, easy).pvalue, rel=0.05)
    half = scipy_stats.t.ppf(0.975, 2) * np.std(hard - easy, ddof=1) / np.sqrt(3)
    assert (row["difference_lo"], row["difference_hi"]) == pytest.approx((-0.15 - half, -0.15 + half), rel=0.02)
    family = differences["p"].notna()
    assert family.sum() == 6 and differences["p_adjusted"].tolist() == pytest.approx(
        holm(differences["p"].to_numpy()).tolist(), nan_ok=True)  # one family: every size's tests
    worst = differences.query("train_size == 100 and measure == 'worst'").iloc[0]
    assert worst["difference"] == pytest.approx(np.mean([0.9 - 0.6, 0.8 - 0.6, 0.9 - 0.6]))


def test_the_sentences_follow_the_tests():
    numbers = regime.regime_numbers(fake_results(repeat=100), {"el2n": "EL2N", "el2n-easy": "EL2N easy"})
    assert numbers["regime_sizes"] == "10 and 100"
    assert numbers["regime_crossing"].startswith("cross between the measured sizes 10 and 100 images per class, "
                                                 "at about 23 interpolated in log size (42 in size; 95 % bootstrap "
                                                 "interval ")
    assert numbers["regime_crossing"].endswith("EL2N behind below it and ahead above it")
    differences = regime.differences_by_size(fake_results(repeat=100), [("el2n", "el2n-easy")])
    accuracy = differences[differences["measure"] == "accuracy"].set_index("train_size")
    p_small = scipy_stats.ttest_rel([10, 11, 13], [14, 14, 15]).pvalue
    # significant alone (p = 0.035), not once adjusted for the chapter's six tests: no direction is claimed
    assert p_small < 0.05 and accuracy.loc[10, "p_adjusted"] >= 0.05
    assert numbers["regime_small_verdict"] == "the data do not show a difference in accuracy between EL2N and EL2N easy"
    assert "Holm-adjusted" in numbers["regime_small_accuracy"]
    clear = {**HITS, (100, "el2n"): [(10, 10), (10, 10), (10, 9)], (100, "el2n-easy"): [(5, 5), (5, 6), (5, 5)]}
    strong = regime.regime_numbers(fake_results(clear, repeat=100), {"el2n": "EL2N", "el2n-easy": "EL2N easy"})
    assert strong["regime_large_verdict"] == "EL2N gives the higher accuracy"
    assert numbers["regime_small_accuracy"].startswith("-15.0 points (95 % CI")
    assert numbers["regime_large_el2n_keeps"] == "c1 (0.70) and c0 (0.30)"
    assert numbers["regime_paper_side"].startswith("outside the range measured here (10–100): at 100, the nearest "
                                                   "size, EL2N is ahead")
    noisy = {**HITS, (10, "el2n"): [(9, 5), (5, 6), (6, 9)]}  # differences 0, -3, 0: not shown
    verdict = regime.regime_numbers(fake_results(noisy), {"el2n": "EL2N", "el2n-easy": "EL2N easy"})
    assert verdict["regime_small_verdict"] == "the data do not show a difference in accuracy between EL2N and EL2N easy"


@pytest.mark.parametrize("per_class, expected", [
    (50, "above the crossing, on the side where el2n pays"),
    (12, "below the crossing, on the side where el2n-easy pays"),
    (20, "within the interval of the crossing: too close to it to tell which side"),
    (5000, "outside the range measured here (10–100): at 100, the nearest size, el2n is ahead; which side 5,000 "
           "images per class are on is not measured here"),
    (5, "outside the range measured here (10–100): at 10, the nearest size, el2n-easy is ahead; which side 5 "),
])
def test_which_side_of_the_crossing(per_class, expected):
    found = {"sizes": [10, 100], "gaps": np.array([-0.15, 0.27]), "point": 22.9, "lo": 15.0, "hi": 30.0}
    assert side_text(per_class, found, {}).startswith(expected)


def test_without_a_crossing_a_size_in_range_is_on_the_leaders_side():
    found = {"sizes": [10, 100], "gaps": np.array([0.1, 0.2]), "point": float("nan"), "lo": float("nan"),
             "hi": float("nan")}
    assert side_text(50, found, {}) == "on the side where el2n pays: the curves do not cross in the range measured"


def test_the_pairs_start_with_keep_hard_against_keep_easy():
    pairs = regime.regime_pairs(list(presets.REGIME_RULES))
    assert pairs[0] == ("el2n", "el2n-easy")
    assert {("el2n-easy", "random"), ("el2n", "el2n-matched"), ("el2n", "dense")} <= set(pairs)


def test_the_recipe_note_names_how_the_study_departs_from_the_paper():
    text = regime.recipe_text(presets.get("cifar10-cpu-regime"))
    assert text.startswith("a ResNet-18 of first-stage width 8 (the paper's: 64), trained 15 epochs at batch 128 "
                           "(the paper: 200 at batch 128); EL2N from K = 3 scoring runs at epoch 4 of 4 (the paper: "
                           "K = 10 at epoch 20 of 200)")
    assert "training sets of 100, 300 and 1,000 images per class" in text
    assert regime.is_cifar10(presets.get("cifar10-cpu-regime")) and not regime.is_cifar10(presets.get("digits-regime"))


def test_the_tables_keep_every_pruned_sparsity_apart():
    """With two pruned sparsities, each gets its own rows: neither the differences nor the keep ratios of one hide
    the other (the differences table used to show the first sparsity's cell alone)."""
    half, more = fake_results(), fake_results()
    more = more[more["score"] != "dense"].assign(sparsity=0.7, key=lambda f: f["key"] + "-0.7")
    more.loc[more["score"] == "el2n", "keep_ratio"] = 0.9
    results = pd.concat([half, more], ignore_index=True)
    differences = regime.differences_by_size(results, [("el2n", "el2n-easy")])
    table = regime.differences_table(differences)
    assert list(table.index.names) == ["rule", "vs", "sparsity", "measure"]
    assert len(table) == 2 * 3 and set(table.index.get_level_values("sparsity")) == {0.5, 0.7}
    ratios = regime.keep_ratios_by_size(results)
    assert list(ratios.index.names) == ["per class", "rule", "sparsity"] and not ratios.index.duplicated().any()
    assert ratios.loc[(10, "el2n", 0.7), "c1"] == 0.9 and ratios.loc[(10, "el2n", 0.5), "c1"] == 0.7
    single = regime.keep_ratios_by_size(half)
    assert list(single.index.names) == ["per class", "rule"]


def test_an_interval_from_resamples_that_often_do_not_cross_is_open():
    """Gaps of one test image either way on 10 test images per class: most resamples do not cross in the range,
    and the interval says so with an open end instead of a closed one from the resamples that cross."""
    weak = {**HITS, (10, "el2n"): [(7, 7)] * 3, (10, "el2n-easy"): [(8, 7), (7, 8), (8, 7)],
            (100, "el2n"): [(8, 7), (7, 8), (8, 7)], (100, "el2n-easy"): [(7, 7)] * 3}
    found = crossing(fake_results(weak), samples=400)
    assert found["point"] == found["point"] and found["fraction_crossing"] < 0.95
    assert found["lo"] == -np.inf or found["hi"] == np.inf
    text = crossing_text(found, {})
    assert "below 10" in text or "above 100" in text
    assert f"{100 * found['fraction_crossing']:.0f} % of bootstrap resamples cross between 10 and 100" in text


def test_a_size_where_a_rule_deletes_a_class_is_named():
    results = fake_results()
    easy_small = (results["score"] == "el2n-easy") & (results["train_size"] == 10) & (results["class_index"] == 1)
    results.loc[easy_small & (results["seed"] < 2), "keep_ratio"] = 0.0
    deleted = regime.deleted_classes(results, 0.5)
    assert deleted.to_dict("records") == [{"train_size": 10, "rule": "el2n-easy", "class": "c1", "seeds": 2,
                                           "of_seeds": 3}]
    text = regime.deleted_text(deleted, {"el2n-easy": "EL2N easy"})
    assert "with 10 images per class, EL2N easy keeps no training image of class c1 (in 2 of 3 seeds)" in text
    assert regime.deleted_text(regime.deleted_classes(fake_results(), 0.5), {}).startswith("No rule deletes")


def test_random_ahead_of_both_rules_is_said_only_where_both_tests_say_so():
    beaten = {  # five seeds: random is far ahead of both at 10 images per class, level with keep-hard at 100
        (10, "el2n"): [(5, 5), (5, 6), (6, 7), (5, 5), (6, 6)], (10, "el2n-easy"): [(7, 7), (7, 7), (8, 7), (7, 8),
                                                                                     (7, 7)],
        (10, "random"): [(10, 10)] * 4 + [(10, 9)], (10, "dense"): [(10, 10)] * 5,
        (100, "el2n"): [(9, 9), (9, 8), (9, 9), (9, 9), (8, 9)], (100, "el2n-easy"): [(6, 6), (7, 6), (6, 6), (6, 7),
                                                                                       (6, 6)],
        (100, "random"): [(9, 9), (9, 8), (9, 9), (8, 9), (9, 9)], (100, "dense"): [(10, 10)] * 5}
    results = fake_results(beaten, repeat=100)
    differences = regime.differences_by_size(results, regime.regime_pairs(["el2n", "el2n-easy", "random"]))
    text = regime.random_ahead_text(differences, [10, 100], {"el2n": "EL2N", "el2n-easy": "EL2N easy"}, 0.5)
    assert text.startswith("With 10 images per class, random pruning beats both EL2N and EL2N easy")
    # at 100, random (18, 17, 18, 17, 18 of 20) is not ahead of keep-hard (18, 17, 18, 18, 17): not claimed there
    assert "10 and 100" not in text
    none = regime.random_ahead_text(regime.differences_by_size(fake_results(repeat=100), regime.regime_pairs(
        ["el2n", "el2n-easy"])), [10, 100], {}, 0.5)
    assert none.startswith("At no size measured is random pruning shown to beat both")
