"""Score-stability measures on hand-made scores."""

import numpy as np
import pytest
import torch
from torch import nn

from datadiet_nb import stability
from datadiet_nb.prune import select_indices


def test_pairwise_spearman_and_agreement_curve():
    base = np.arange(100, dtype=float)
    rng = np.random.default_rng(0)
    identical = np.stack([base] * 4)
    assert stability.mean_pairwise_spearman(identical) == pytest.approx(1.0)
    assert np.isnan(stability.mean_pairwise_spearman(identical[:1]))
    noisy = np.stack([base + rng.normal(0, 30, 100) for _ in range(6)])
    curve = stability.agreement_curve(noisy)
    assert list(curve["k"]) == [1, 2, 3, 4, 5]
    assert curve["spearman"].is_monotonic_increasing and curve["spearman"].iloc[-1] < 1.0
    reversed_runs = np.stack([base, -base])
    assert stability.mean_pairwise_spearman(reversed_runs) == pytest.approx(-1.0)


def test_keep_ratio_over_runs_by_hand():
    labels = np.array([0, 0, 1, 1])
    runs = np.array([[4.0, 3.0, 2.0, 1.0],   # keeps both of class 0
                     [4.0, 1.0, 3.0, 2.0]])  # keeps one of each
    table = stability.keep_ratio_over_runs(runs, labels, 0.5, ["a", "b"]).set_index("class")
    assert table.loc["a", "run_mean"] == pytest.approx(0.75) and table.loc["b", "run_mean"] == pytest.approx(0.25)
    assert (table.loc["a", "run_min"], table.loc["a", "run_max"]) == (0.5, 1.0)
    # two runs: a t-interval wider than [0, 1] (0.75 +- 3.18), cut to the keep ratio's range
    assert (table.loc["a", "run_lo"], table.loc["a", "run_hi"]) == (0.0, 1.0)
    assert (table.loc["b", "run_lo"], table.loc["b", "run_hi"]) == (0.0, 1.0)
    # the study prunes with the mean score [4, 2, 2.5, 1.5]: keeps examples 0 and 2
    assert table.loc["a", "keep_ratio"] == 0.5 and table.loc["b", "keep_ratio"] == 0.5


def test_keep_ratio_by_epoch_reads_the_trajectory():
    labels = np.array([0, 0, 1, 1])
    early = np.array([[1.0, 2.0, 3.0, 4.0]] * 2)
    late = np.array([[4.0, 3.0, 2.0, 1.0]] * 2)
    scores = {"el2n_at1_runs": early, "el2n_runs": late, "el2n": late.mean(0)}
    table = stability.keep_ratio_by_epoch(scores, 3, labels, 0.5, ["a", "b"])
    ratio = table.set_index(["epoch", "class"])["keep_ratio"]
    assert ratio[(1, "b")] == 1.0 and ratio[(3, "a")] == 1.0 and sorted(table["epoch"].unique()) == [1, 3]


def test_grand_at_init_vs_input_norm_is_high_for_a_linear_model_at_init():
    """For a linear softmax model with near-zero weights, GraNd ~ sqrt(||x||^2 + 1) * ||p - y||: ranks by norm."""
    torch.manual_seed(0)
    model = nn.Linear(20, 3)
    nn.init.normal_(model.weight, std=1e-4)
    nn.init.zeros_(model.bias)
    inputs = torch.randn(50, 20) * torch.rand(50, 1) * 5
    assert stability.grand_at_init_vs_input_norm(model, inputs, torch.randint(0, 3, (50,))) > 0.99


def test_rank_agreement_on_hand_made_rankings():
    """rho = 1 - 6 sum d^2 / (n (n^2 - 1)) with n = 5 (denominator 120), computed by hand for each pair."""
    from datadiet_nb.stability import rank_agreement

    scores = {"el2n": np.array([1.0, 2, 3, 4, 5]), "grand": np.array([0.1, 0.3, 0.2, 0.5, 0.4]),  # d^2 = 4: 0.8
              "el2n_runs": np.array([[1.0, 2, 3, 4, 5], [1, 2, 3, 5, 4], [2, 1, 3, 4, 5]]),  # 0.9, 0.9, 0.8
              "grand_runs": np.array([[1.0, 2, 3, 4, 5], [5, 4, 3, 2, 1]])}  # reversed: -1
    agreement = rank_agreement(scores)
    assert agreement == pytest.approx({"el2n_vs_grand": 0.8, "el2n_across_runs": 2.6 / 3, "grand_across_runs": -1.0})


# --- compare: two score sets on the same data, by hand-made pairs ---------------------------------------------

CLASSES = ["a", "b", "c"]


def made_scores(seed: int = 0):
    """90 examples of 3 classes whose scores differ by class (class c hardest), in interleaved order."""
    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(3), 30)
    return labels, rng.random(90) + labels  # class 2 scores highest


def test_identical_scores_agree_perfectly():
    labels, a = made_scores()
    found = stability.compare(a, a.copy(), labels, CLASSES, (0.0, 0.5, 0.7))
    assert found.summary.loc["Spearman, all examples", "value"] == pytest.approx(1.0)
    assert found.per_class["spearman"].tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert found.overlap["sparsity"].tolist() == [0.5, 0.7]  # the dense point has nothing to compare
    assert found.overlap["overlap"].tolist() == [1.0, 1.0] and found.overlap["kept"].tolist() == [45, 27]
    assert found.overlap["keep_ratio_spearman"].tolist() == [1.0, 1.0] and found.warnings == []


def test_reversed_scores_overlap_nowhere_and_are_flagged():
    labels, a = made_scores()
    found = stability.compare(a, -a, labels, CLASSES, (0.5,), names=("ours", "theirs"))
    assert found.summary.loc["Spearman, all examples", "value"] == pytest.approx(-1.0)
    assert found.overlap["overlap"].tolist() == [0.0]  # the 45 highest of one are the 45 lowest of the other
    assert found.per_class["keep_ours_0.5"].tolist() == pytest.approx([0.0, 0.5, 1.0])  # by hand: class c first
    assert found.per_class["keep_theirs_0.5"].tolist() == pytest.approx([1.0, 0.5, 0.0])
    assert found.overlap["keep_ratio_spearman"].tolist() == pytest.approx([-1.0])
    assert len(found.warnings) == 1 and found.warnings[0].startswith("theirs ranks in reverse of ours (Spearman -1.00)")


def test_scores_shuffled_within_class_keep_the_same_classes_but_not_the_same_examples():
    labels, a = made_scores()
    rng = np.random.default_rng(1)
    b = a.copy()
    for c in range(3):
        members = np.flatnonzero(labels == c)
        b[members] = a[rng.permutation(members)]
    found = stability.compare(a, b, labels, CLASSES, (0.5,))
    assert found.per_class["keep_a_0.5"].tolist() == found.per_class["keep_b_0.5"].tolist()  # same class counts
    assert found.overlap["keep_ratio_spearman"].tolist() == [1.0]
    assert abs(found.summary.loc["Spearman within class (mean over classes)", "value"]) < 0.4  # no agreement inside
    assert found.summary.loc["Spearman, all examples", "value"] > 0.7  # the class effect alone
    kept_a, kept_b = select_indices(a, 0.5), select_indices(b, 0.5)
    overlap = len(np.intersect1d(kept_a, kept_b)) / 45
    assert found.overlap["overlap"].iloc[0] == pytest.approx(overlap) and overlap < 1.0


def test_a_grand_at_init_that_equals_the_input_norm_is_flagged():
    labels, a = made_scores()
    norm = np.random.default_rng(2).random(90) * 10
    found = stability.compare(a, norm.copy(), labels, CLASSES, (0.5,), names=("EL2N", "GraNd@0"), input_norm=norm)
    assert any(w.startswith("GraNd@0 follows the input norm (Spearman 1.00)") for w in found.warnings)
    assert stability.compare(a, a, labels, CLASSES, (0.5,), input_norm=norm).warnings == []
