import re

import numpy as np
import pytest

from datadiet_nb.errors import UserError
from datadiet_nb.metrics import bias_measures, change_vs_dense, class_accuracy, overall_accuracy, rank_correlation
from datadiet_nb.prune import (ccs_bins, ccs_indices, class_balanced_indices, class_keep_ratio, drop_indices,
                               drop_quotas,
                               largest_remainder, matched_random_indices, num_kept, random_indices, select_indices)


def test_select_keeps_round_count_of_highest_scores():
    rng = np.random.default_rng(0)
    scores = rng.random(1000)
    for sparsity in (0.0, 0.1, 0.25, 0.5, 0.9, 0.999):
        kept = select_indices(scores, sparsity)
        assert len(kept) == round((1 - sparsity) * 1000)
        assert kept.dtype == np.int64 and np.all(np.diff(kept) > 0)
        if len(kept) < 1000:
            dropped = np.setdiff1d(np.arange(1000), kept)
            assert scores[kept].min() > scores[dropped].max()


def test_select_by_hand():
    scores = np.array([0.1, 0.9, 0.5, 0.7, 0.3])
    assert select_indices(scores, 0.6).tolist() == [1, 3]  # keep 2: the two highest
    assert select_indices(scores, 0.6, offset=0.2).tolist() == [2, 3]  # skip the top 1 (index 1)
    assert select_indices(scores, 0.4, offset=0.4).tolist() == [0, 2, 4]


def test_ties_are_broken_by_index():
    scores = np.array([1.0, 2.0, 2.0, 2.0, 1.0])
    assert select_indices(scores, 0.6).tolist() == [1, 2]
    assert select_indices(scores, 0.2).tolist() == [0, 1, 2, 3]
    assert select_indices(np.zeros(6), 0.5).tolist() == [0, 1, 2]


def test_easy_selection_keeps_the_lowest_scores_by_hand():
    scores = np.array([0.1, 0.9, 0.5, 0.7, 0.3])
    assert select_indices(scores, 0.6, easiest=True).tolist() == [0, 4]  # keep 2: the two lowest
    assert select_indices(scores, 0.4, easiest=True).tolist() == [0, 2, 4]
    assert select_indices(scores, 0.0, easiest=True).tolist() == [0, 1, 2, 3, 4]
    assert select_indices(scores, 0.6, offset=0.2, easiest=True).tolist() == [2, 4]  # skip the easiest one


def test_easy_selection_breaks_ties_by_index_and_rounds_like_the_hard_rule():
    scores = np.array([1.0, 2.0, 2.0, 2.0, 1.0])
    assert select_indices(scores, 0.8, easiest=True).tolist() == [4]  # of the two 1.0s, the higher index
    assert select_indices(scores, 0.4, easiest=True).tolist() == [0, 3, 4]  # then the last of the 2.0s
    assert select_indices(np.zeros(6), 0.5, easiest=True).tolist() == [3, 4, 5]  # what the hard rule leaves
    assert len(select_indices(np.arange(7.0), 0.5, easiest=True)) == 4  # 3.5 rounds up, as num_kept
    rng = np.random.default_rng(1)
    values = rng.random(101)
    easy, hard = select_indices(values, 0.3, easiest=True), select_indices(values, 0.7)
    assert len(easy) == num_kept(101, 0.3) and values[easy].max() < np.delete(values, easy).min()
    assert np.intersect1d(hard, select_indices(values, 0.7, easiest=True)).size == 0  # 30 hardest vs 30 easiest


def test_keep_easy_is_the_complement_of_keep_hard_at_ties():
    scores = np.array([0.2, 0.5, 0.5, 0.5, 0.5, 0.9])
    assert select_indices(scores, 0.5).tolist() == [1, 2, 5]
    assert select_indices(scores, 0.5, easiest=True).tolist() == [0, 3, 4]
    rounded = np.random.default_rng(0).integers(0, 4, size=40).astype(float)  # many ties
    for keep in range(1, 40):  # sparsity 1 keeps nothing and is refused
        hard = select_indices(rounded, 1 - keep / 40)
        easy = select_indices(rounded, keep / 40, easiest=True)
        assert len(hard) == keep and len(easy) == 40 - keep
        assert sorted(np.concatenate([hard, easy]).tolist()) == list(range(40))


def test_num_kept_rounds_half_up_and_survives_float_error():
    assert num_kept(1000, 0.9) == 100  # (1 - 0.9) * 1000 = 99.99999999999999
    assert num_kept(5, 0.5) == 3
    assert num_kept(10, 0.0) == 10
    assert num_kept(45, 0.3) == 32  # (1 - 0.3) * 45 = 31.499999999999996 in floats, 31.5 exactly


def test_num_kept_is_the_exact_decimal_rounding_for_every_small_set():
    from fractions import Fraction
    for sparsity in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.25, 0.75, 0.05):
        for n in range(1, 2000):
            exact = (1 - Fraction(str(sparsity))) * n
            assert num_kept(n, sparsity) == int(exact + Fraction(1, 2)), (n, sparsity)


@pytest.mark.parametrize("sparsity, offset, message", [
    (-0.1, 0.0, "sparsity must be in [0, 1), got -0.1"), (1.0, 0.0, "sparsity must be in [0, 1), got 1.0"),
    (1.5, 0.0, "sparsity must be in [0, 1), got 1.5"), (0.5, 1.0, "offset must be in [0, 1), got 1.0"),
    (0.5, -0.1, "offset must be in [0, 1), got -0.1"),
    (0.2, 0.3, "offset 0.3 + keep fraction 0.8 exceeds 1: not enough examples to keep"),
    (0.5, 0.6, "offset 0.6 + keep fraction 0.5 exceeds 1"), (0.3, 0.30001, "offset 0.30001 + keep fraction 0.7"),
])
def test_bad_sparsity_or_offset(sparsity, offset, message):
    with pytest.raises(UserError, match=re.escape(message)):
        select_indices(np.arange(10.0), sparsity, offset=offset)


def test_an_offset_that_exactly_fills_the_set_keeps_the_lowest_scores():
    """offset + keep fraction = 1 is allowed; with round-half-up counts (5 examples: skip 3, keep 3) the kept
    window is clamped to the last ``keep`` ranks rather than running past the end."""
    scores = np.array([0.1, 0.9, 0.5, 0.7, 0.3])
    assert select_indices(scores, 0.5, offset=0.5).tolist() == [0, 2, 4]  # ranks 3-5 of 0.9, 0.7, 0.5, 0.3, 0.1
    assert select_indices(scores, 0.3, offset=0.3).tolist() == [0, 2, 3, 4]  # skip 2, keep 4: clamped to ranks 2-5


def test_scores_that_are_not_one_finite_value_per_example_are_refused():
    with pytest.raises(UserError, match=re.escape("scores must be one value per example, got shape (2, 3)")):
        select_indices(np.ones((2, 3)), 0.5)
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(UserError, match="^scores contain NaN or infinite values$"):
            select_indices(np.array([0.1, bad, 0.3]), 0.5)


def test_random_baseline_is_seeded_uniform_and_unbalanced():
    a, b, c = (random_indices(1000, 0.7, seed=s) for s in (1, 1, 2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert len(a) == 300 and len(np.unique(a)) == 300 and np.all(np.diff(a) > 0)
    assert a.dtype == np.int64


def test_class_keep_ratio_by_hand():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    kept = np.array([0, 1, 4, 5, 6])
    np.testing.assert_allclose(class_keep_ratio(labels, kept, 4)[:3], [0.5, 1.0, 0.5])
    assert np.isnan(class_keep_ratio(labels, kept, 4)[3])  # a class with no examples


def test_class_accuracy_and_bias_by_hand():
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
    predictions = np.array([0, 1, 1, 1, 0, 2, 2, 2, 2, 0])
    acc = class_accuracy(predictions, labels, 3)
    np.testing.assert_allclose(acc, [0.5, 2 / 3, 0.8])
    assert overall_accuracy(predictions, labels) == pytest.approx(0.7)
    bias = bias_measures(acc)
    assert bias["std"] == pytest.approx(np.std([0.5, 2 / 3, 0.8]))
    assert (bias["worst"], bias["best"]) == (0.5, 0.8)
    assert bias["gap"] == pytest.approx(0.3)
    assert bias["cv"] == pytest.approx(np.std([0.5, 2 / 3, 0.8]) / np.mean([0.5, 2 / 3, 0.8]))
    assert bias["worst_10pct"] == 0.5  # 3 classes: the worst one


def test_the_worst_10_percent_is_the_mean_of_the_worst_tenth_of_the_classes_rounded_up():
    acc = np.linspace(0.05, 1.0, 20)  # 20 classes: the worst 2
    assert bias_measures(acc)["worst_10pct"] == pytest.approx((0.05 + 0.1) / 2)
    acc = np.linspace(0.01, 1.0, 100)  # 100 classes: the worst 10
    assert bias_measures(acc)["worst_10pct"] == pytest.approx(np.mean(acc[:10]))
    assert bias_measures(np.linspace(0.1, 1.0, 11))["worst_10pct"] == pytest.approx((0.1 + 0.19) / 2)  # 11: worst 2


def test_change_vs_dense_by_hand():
    acc, dense, keep = np.array([0.6, 0.9, 0.7]), np.array([0.8, 0.9, 0.4]), np.array([0.5, 0.2, 0.9])
    got = change_vs_dense(acc, dense, keep)
    assert got["mean_abs_change"] == pytest.approx((0.2 + 0.0 + 0.3) / 3)
    # dense error 0.2, 0.1, 0.6 ranks 2, 1, 3; keep ratio ranks 2, 1, 3: rho = 1
    assert got["keep_error_spearman"] == pytest.approx(1.0)
    # reversed keep ratio ranks 3, 1, 2 against 2, 1, 3: d = 1, 0, -1, rho = 1 - 6 * 2 / (3 * 8) = 0.5
    assert change_vs_dense(acc, dense, keep[::-1])["keep_error_spearman"] == pytest.approx(0.5)
    assert np.isnan(change_vs_dense(acc, dense, np.full(3, 0.5))["keep_error_spearman"])  # a balanced rule: no ranking
    # balanced up to rounding (6 of 12, 45 of 89, 50 of 101): flat, no rho; a spread of 0.02 or more has one
    rounded = np.array([6 / 12, 45 / 89, 50 / 101])
    assert np.ptp(rounded) < 0.02 and np.isnan(change_vs_dense(acc, dense, rounded)["keep_error_spearman"])
    assert change_vs_dense(acc, dense, np.array([0.50, 0.49, 0.51]))["keep_error_spearman"] == pytest.approx(1.0)
    from scipy.stats import spearmanr
    rng = np.random.default_rng(0)
    a, b = rng.random((5, 10)), rng.random((5, 10))
    np.testing.assert_allclose(rank_correlation(a, b), [spearmanr(x, y).statistic for x, y in zip(a, b)])


def test_class_accuracy_with_a_missing_class_a_single_example_and_a_class_never_right():
    labels = [0, 0, 1, 2, 2]  # class 1 has one example, class 3 none; class 2 is never predicted right
    predictions = [0, 1, 1, 0, 1]
    acc = class_accuracy(predictions, labels, 4)
    np.testing.assert_array_equal(acc[:3], [0.5, 1.0, 0.0])
    assert np.isnan(acc[3]) and acc.shape == (4,)
    with pytest.raises(ValueError, match=r"\(4,\) predictions for \(5,\) labels"):
        class_accuracy(predictions[:4], labels, 4)
    assert bias_measures(acc) == pytest.approx({"std": np.std([0.5, 1.0, 0.0]), "worst": 0.0, "best": 1.0, "gap": 1.0,
                                                "cv": np.std([0.5, 1.0, 0.0]) / 0.5, "worst_10pct": 0.0})


def test_class_keep_ratio_of_an_empty_selection_and_of_a_one_example_class():
    np.testing.assert_array_equal(class_keep_ratio([0, 1, 1, 2], [], 3), [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(class_keep_ratio([0, 1, 1, 2], [1, 3], 3), [0.0, 0.5, 1.0])


def test_labels_stored_as_floats_still_count_as_classes():
    """Labels that came back as floats (a JSON round trip, a pandas column with a NaN elsewhere) are class indices."""
    labels = np.array([0.0, 0.0, 1.0, 2.0])
    np.testing.assert_array_equal(class_accuracy([0, 1, 1, 2], labels, 3), [0.5, 1.0, 1.0])
    np.testing.assert_array_equal(class_keep_ratio(labels, [0, 3], 3), [0.5, 0.0, 1.0])


# --- class-aware rules (issue 12): the same fraction per class, matched counts, DRoP quotas ---------------

def test_largest_remainder_by_hand():
    assert largest_remainder([1.5, 1.5, 1.0], 4).tolist() == [2, 1, 1]  # a tie goes to the lower index
    assert largest_remainder([0.4, 0.6], 1).tolist() == [0, 1]
    assert largest_remainder([2.9999999999, 1.0000000001], 4).tolist() == [3, 1]  # float noise is not a remainder
    assert largest_remainder([0.9, 0.8, 0.3], 2, caps=[0, 5, 5]).tolist() == [0, 1, 1]  # a full entry is skipped


def test_class_balanced_keeps_the_same_fraction_of_every_class():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])  # 3, 2, 5 examples
    scores = np.array([0.1, 0.9, 0.5, 0.2, 0.3, 0.8, 0.7, 0.1, 0.6, 0.4])
    # (1 - 0.5) n_c = 1.5, 1, 2.5: floors 1, 1, 2 and the one left (5 = round(0.5 * 10)) to class 0, the lower tie
    kept = class_balanced_indices(scores, labels, 0.5, 3)
    assert kept.tolist() == [1, 2, 4, 5, 6] and kept.dtype == np.int64
    randomly = class_balanced_indices(None, labels, 0.5, 3, seed=0)
    assert np.bincount(labels[randomly], minlength=3).tolist() == [2, 1, 2] and np.all(np.diff(randomly) > 0)
    assert np.array_equal(randomly, class_balanced_indices(None, labels, 0.5, 3, seed=0))
    draws = {tuple(class_balanced_indices(None, labels, 0.5, 3, seed=s)) for s in range(50)}
    assert len(draws) > 10 and set().union(*draws) == set(range(10))  # uniform within class: every example can be drawn
    big = np.repeat(np.arange(4), [101, 57, 33, 9])
    for sparsity in (0.1, 0.3, 0.5, 0.7, 0.9):
        counts = np.bincount(big[class_balanced_indices(None, big, sparsity, 4, seed=1)], minlength=4)
        assert counts.sum() == num_kept(200, sparsity)
        assert np.all(np.abs(counts - (1 - sparsity) * np.array([101, 57, 33, 9])) < 1)
    with pytest.raises(UserError, match="one finite value per example"):
        class_balanced_indices(scores[:-1], labels, 0.5, 3)


def test_matched_random_takes_the_reference_counts_per_class_at_random_within_class():
    labels = np.repeat(np.arange(3), [40, 30, 30])
    reference = select_indices(np.random.default_rng(0).random(100) + 0.5 * (labels == 2), 0.6)
    matched = matched_random_indices(labels, reference, 3, seed=4)
    assert np.array_equal(np.bincount(labels[matched], minlength=3), np.bincount(labels[reference], minlength=3))
    assert matched.dtype == np.int64 and np.all(np.diff(matched) > 0) and not np.array_equal(matched, reference)
    assert np.array_equal(matched, matched_random_indices(labels, reference, 3, seed=4))
    assert not np.array_equal(matched, matched_random_indices(labels, reference, 3, seed=5))


@pytest.mark.parametrize("error, sizes, n_keep, expected", [
    ([0.5, 0.1, 0.4], [10, 10, 10], 15, [8, 1, 6]),      # 7.5, 1.5, 6: the .5 tie to the lower class
    ([0.9, 0.05, 0.05], [5, 100, 100], 60, [5, 28, 27]),  # class 0 full at 5; 55 shared evenly
    ([0.0, 0.0, 0.0], [10, 20, 30], 30, [5, 10, 15]),    # no error anywhere: by class size
    ([1.0, 0.0, 0.0], [5, 20, 30], 25, [5, 8, 12]),      # the only erring class full: the rest by size
    ([0.3, 0.2], [4, 6], 10, [4, 6]),                    # everything kept
])
def test_drop_quotas_by_hand(error, sizes, n_keep, expected):
    quotas = drop_quotas(error, sizes, n_keep)
    assert quotas.tolist() == expected and quotas.sum() == n_keep and np.all(quotas <= sizes)


def test_drop_indices_keep_each_classes_quota_at_random_or_by_score():
    labels = np.array([0] * 10 + [1] * 10 + [2] * 10)
    scores = np.arange(30.0)[::-1]  # within each class the lowest index scores highest
    error = [0.5, 0.1, 0.4]  # quotas of 15: [8, 1, 6] (see the table above)
    by_score = drop_indices(error, labels, 0.5, 3, scores=scores, seed=0)
    assert by_score.tolist() == list(range(8)) + [10] + list(range(20, 26))
    at_random = drop_indices(error, labels, 0.5, 3, seed=0)
    assert at_random.dtype == np.int64 and np.all(np.diff(at_random) > 0)
    assert np.bincount(labels[at_random], minlength=3).tolist() == [8, 1, 6]
    assert np.array_equal(at_random, drop_indices(error, labels, 0.5, 3, seed=0))
    assert not np.array_equal(at_random, drop_indices(error, labels, 0.5, 3, seed=1))


def test_drop_quotas_sum_to_n_keep_within_class_sizes_and_follow_the_error():
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(1, 60, size=rng.integers(2, 12))
        error = rng.random(len(sizes)) * (rng.random(len(sizes)) < 0.8)
        n_keep = int(rng.integers(0, sizes.sum() + 1))
        quotas = drop_quotas(error, sizes, n_keep)
        assert quotas.sum() == n_keep and np.all((0 <= quotas) & (quotas <= sizes))
        open_ = quotas < sizes  # the classes not full share what the full ones left, in proportion to error
        weights = error[open_] if error[open_].sum() > 0 else sizes[open_].astype(float)
        if open_.any():
            ideal = (n_keep - sizes[~open_].sum()) * weights / weights.sum()
            assert np.all(np.abs(quotas[open_] - ideal) < 1.5)
    for bad, message in (((-0.1, 0.2), ">= 0"), ((np.nan, 0.2), "finite")):
        with pytest.raises(UserError, match=message):
            drop_quotas(bad, [5, 5], 4)
    with pytest.raises(UserError, match="cannot keep 11 of 10 examples"):
        drop_quotas([0.1, 0.2], [5, 5], 11)


# --- CCS -------------------------------------------------------------------------------------------

def test_ccs_cuts_the_hardest_beta_and_bins_the_rest_by_equal_width():
    scores = np.array([0.0, 9.0, 1.0, 2.5, 10.0, 4.0, 3.0, 5.0, 7.4, 6.0])
    left, which = ccs_bins(scores, beta=0.2, bins=4)  # the 2 hardest (10.0, 9.0) go; range [0, 7.4], width 1.85
    assert left.tolist() == [0, 2, 3, 5, 6, 7, 8, 9]
    assert which.tolist() == [0, 0, 1, 2, 1, 2, 3, 3]  # 0.0 1.0 | 2.5 3.0 | 4.0 5.0 | 6.0 7.4 (the max in the last)


def test_ccs_takes_evenly_from_the_strata_smallest_first():
    # 4 bins of width 2 over [0, 8]: sizes 1, 2, 3, 6 after cutting nothing (beta 0); keep 8 of 12
    scores = np.array([0.0, 2.5, 2.6, 4.5, 4.6, 4.7, 6.1, 6.2, 6.3, 6.4, 6.5, 8.0])
    kept = ccs_indices(scores, sparsity=1 - 8 / 12, beta=0.0, bins=4, seed=0)
    assert kept.dtype == np.int64 and np.all(np.diff(kept) > 0) and len(kept) == 8
    bins = np.minimum(scores[kept] // 2, 3).astype(int)
    # budget 8 over 4 strata: the 1 of bin 0, then min(2, 7 // 3) = 2, min(3, 5 // 2) = 2, then the last 3 of bin 3
    assert np.bincount(bins, minlength=4).tolist() == [1, 2, 2, 3]
    assert np.array_equal(kept, ccs_indices(scores, sparsity=1 - 8 / 12, beta=0.0, bins=4, seed=0))
    assert not np.array_equal(kept, ccs_indices(scores, sparsity=1 - 8 / 12, beta=0.0, bins=4, seed=1))


def test_ccs_never_keeps_the_cut_examples_and_keeps_round_1_minus_s_n():
    rng = np.random.default_rng(3)
    scores = rng.gamma(2.0, size=500)
    hardest = set(np.argsort(-scores, kind="stable")[:50].tolist())
    for sparsity in (0.1, 0.5, 0.9):
        kept = ccs_indices(scores, sparsity=sparsity, beta=0.1, bins=20, seed=0)
        assert len(kept) == round((1 - sparsity) * 500) and not hardest & set(kept.tolist())


def test_ccs_refuses_a_beta_that_leaves_too_few_examples():
    with pytest.raises(UserError, match="CCS with beta=0.3 keeps at most 7 of 10 examples, but sparsity 0.1 keeps 9"):
        ccs_indices(np.arange(10.0), sparsity=0.1, beta=0.3, bins=2, seed=0)
    with pytest.raises(UserError, match="keeps at most 7 of 10 examples, but sparsity 0.2 keeps 8"):  # one short
        ccs_indices(np.arange(10.0), sparsity=0.2, beta=0.3, bins=2, seed=0)
    assert ccs_indices(np.arange(10.0), sparsity=0.3, beta=0.3, bins=2, seed=0).tolist() == list(range(7))


def test_ccs_cuts_round_beta_n_with_halves_rounded_up_like_the_kept_count():
    left, _ = ccs_bins(np.arange(10.0), beta=0.25, bins=2)  # 2.5 examples: the 3 hardest go
    assert left.tolist() == list(range(7))
