"""Every pruning rule through the study: presets accept it, kept_indices applies it to the stored scores, a sweep
runs it, and DRoP's class error rates come from a validation split of the training set, never the test set."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from datadiet_nb import experiment, presets
from datadiet_nb.errors import UserError
from datadiet_nb.experiment import (VALIDATION_FRACTION, compute_scores, kept_indices, load_dataset, run_config,
                                    validation_split)
from datadiet_nb.scores import forgetting_scores
from datadiet_nb.prune import (RULES, ccs_indices, class_balanced_indices, drop_indices, matched_random_indices,
                               num_kept, random_indices, select_indices)
from datadiet_nb.store import Store, config_key
from datadiet_nb.sweep import jobs, run_sweep

SPARSITY = 0.5


@pytest.fixture
def study(tiny_digits, tmp_path):
    """(preset with every rule, its dataset, a store holding its scores), every seed pruned by the same scores
    (per-seed scoring: tests/test_per_seed_scoring.py)."""
    preset = presets.with_overrides(tiny_digits, [f"scores={','.join(RULES)}", "ccs_bins=5", "scoring.per_seed=false"])
    dataset = load_dataset(preset)
    store = Store(tmp_path / "runs")
    compute_scores(preset, dataset, store)
    return preset, dataset, store


def expected_kept(rule: str, preset, dataset, store, seed: int) -> np.ndarray:
    """The rule applied by hand to the stored scores (and, for DRoP, the stored validation accuracies)."""
    labels, classes = dataset.train_labels.numpy(), dataset.num_classes
    scores = compute_scores(preset, dataset, store)[RULES[rule]] if RULES[rule] else None
    by_hand = {
        "random": lambda: random_indices(len(labels), SPARSITY, seed=seed),
        "el2n": lambda: select_indices(scores, SPARSITY), "grand": lambda: select_indices(scores, SPARSITY),
        "random-balanced": lambda: class_balanced_indices(None, labels, SPARSITY, classes, seed=seed),
        "el2n-balanced": lambda: class_balanced_indices(scores, labels, SPARSITY, classes),
        "grand-balanced": lambda: class_balanced_indices(scores, labels, SPARSITY, classes),
        "el2n-matched": lambda: matched_random_indices(labels, select_indices(scores, SPARSITY), classes, seed=seed),
        "grand-matched": lambda: matched_random_indices(labels, select_indices(scores, SPARSITY), classes, seed=seed),
        "ccs": lambda: ccs_indices(scores, SPARSITY, beta=preset.ccs_beta, bins=5, seed=seed),
        "forgetting": lambda: select_indices(scores, SPARSITY),
        "el2n-easy": lambda: select_indices(-scores, SPARSITY), "grand-easy": lambda: select_indices(-scores, SPARSITY),
    }
    if rule.startswith("drop"):
        accuracy = experiment.validation_class_accuracy(preset, dataset, store)
        return drop_indices(1 - accuracy, labels, SPARSITY, classes, scores=scores, seed=seed)
    return by_hand[rule]()


@pytest.mark.parametrize("rule", list(RULES))
def test_kept_indices_applies_each_rule_to_the_stored_scores(study, rule):
    preset, dataset, store = study
    kept = kept_indices(preset, dataset, rule, SPARSITY, 0, store)
    assert kept.dtype == np.int64 and np.all(np.diff(kept) > 0)
    assert len(kept) == num_kept(dataset.num_train, SPARSITY)
    assert np.array_equal(kept, expected_kept(rule, preset, dataset, store, seed=0))
    again = kept_indices(preset, dataset, rule, SPARSITY, 0, store)
    assert np.array_equal(kept, again)  # deterministic for a seed
    other_seed = kept_indices(preset, dataset, rule, SPARSITY, 1, store)
    draws_at_random = rule in ("random", "random-balanced", "el2n-matched", "grand-matched", "ccs", "drop")
    assert np.array_equal(kept, other_seed) != draws_at_random


def test_matched_rules_keep_the_scores_per_class_counts_and_balanced_ones_the_same_fraction(study):
    preset, dataset, store = study
    labels = dataset.train_labels.numpy()

    def counts(rule):
        return np.bincount(labels[kept_indices(preset, dataset, rule, SPARSITY, 0, store)], minlength=10)

    for score in ("el2n", "grand"):
        assert np.array_equal(counts(f"{score}-matched"), counts(score))
        assert not np.array_equal(counts(f"{score}-balanced"), counts(score))
        sizes = np.bincount(labels, minlength=10)
        assert np.all(np.abs(counts(f"{score}-balanced") - (1 - SPARSITY) * sizes) < 1)


class Untouchable:
    """Stands for the test set: its length may be known (it is part of the dataset's description); reading it fails."""

    def __init__(self, length: int):
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, item):
        raise AssertionError("the test set was read")

    def __getattr__(self, name):
        raise AssertionError(f"the test set was read (.{name})")


def test_drop_measures_class_error_on_a_validation_split_and_never_reads_the_test_set(tiny_digits, tmp_path,
                                                                                         monkeypatch):
    preset = presets.with_overrides(tiny_digits, ["scores=drop"])
    dataset = load_dataset(preset)
    blind = dataclasses.replace(dataset, test_images=Untouchable(len(dataset.test_labels)),
                                test_labels=Untouchable(len(dataset.test_labels)))
    trained_on, real_train = [], experiment.train

    def spy(model, data, recipe, *, indices=None, **kwargs):
        trained_on.append(indices.numpy())
        return real_train(model, data, recipe, indices=indices, **kwargs)

    monkeypatch.setattr(experiment, "train", spy)
    store = Store(tmp_path / "runs")
    kept = kept_indices(preset, blind, "drop", SPARSITY, 0, store)
    assert len(kept) == num_kept(dataset.num_train, SPARSITY)
    _, held_out = validation_split(dataset.train_labels.numpy(), VALIDATION_FRACTION, preset.seeds[0])
    [indices] = trained_on
    assert not set(indices) & set(held_out) and len(indices) + len(held_out) == dataset.num_train
    # the run's key depends on the validation ranking it used
    assert "validation_key" in run_config(preset, dataset, "drop", SPARSITY, 0)
    with pytest.raises(AssertionError, match="the test set was read"):  # the guard itself works
        experiment.train_run(preset, blind, "dense", 0.0, 0, store)


def test_a_sweep_runs_every_rule_and_only_score_rules_wait_for_the_scores(study):
    preset, dataset, store = study
    planned = {job.label: job for job in jobs(preset, dataset)}
    scores_key = config_key(experiment.scores_config(preset, dataset))
    for rule, base in RULES.items():
        assert planned[f"{rule}-s0.5-seed0"].needs == ((scores_key,) if base else ())
    outcome = run_sweep(preset, store, progress=False)
    assert not outcome.failures
    assert sorted(r["score"] for r in outcome.records) == sorted(["dense", *RULES])


@pytest.mark.parametrize("assignments, message", [
    (["scores=el2n-balanced", "offset=0.1"], "an offset applies only to the rules"),
    (["scores=ccs", "ccs_beta=0.6"], "ccs with ccs_beta=0.6 cuts more than sparsity 0.5 removes"),
    (["scores=ccs", "ccs_bins=0"], "ccs_beta must be in [0, 1) and ccs_bins >= 1"),
    (["scores=el2n-sorted"], "unknown score 'el2n-sorted'"),
    (["scores=forgetting", "scoring.epochs.forgetting=0"], "forgetting events are counted over at least 1 epoch"),
    (["scores=forgetting", "scoring.epochs.forgetting=9"], "forgetting is counted over 9 epochs but the scoring recipe"),
])
def test_rule_options_that_cannot_work_are_refused(tiny_digits, assignments, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        presets.with_overrides(tiny_digits, assignments)


def test_forgetting_events_by_hand():
    correct = np.array([[1, 0, 1, 1],   # after epoch 1
                        [0, 0, 1, 0],   # 2
                        [1, 0, 1, 1],   # 3
                        [0, 0, 1, 1]])  # 4
    # example 0 forgotten twice, 1 never learned (counts as E = 4), 2 never forgotten, 3 once
    np.testing.assert_array_equal(forgetting_scores(correct), [2.0, 4.0, 0.0, 1.0])
    assert forgetting_scores(np.ones((1, 3)))[0] == 0.0 and forgetting_scores(np.zeros((1, 3)))[0] == 1.0


def test_scoring_runs_count_forgetting_on_an_unaugmented_pass_after_each_epoch(tiny_digits, tmp_path, monkeypatch):
    preset = presets.with_overrides(tiny_digits, ["scores=forgetting,el2n", "recipe.epochs=4",
                                                  "scoring.epochs.forgetting=4", "scoring.num_runs=2"])
    dataset = load_dataset(preset)
    passes, real = [], experiment.EPOCH_FUNCTIONS["correct"]

    from datadiet_nb.data import normalize
    unaugmented = normalize(dataset.train_images, torch.tensor(dataset.mean), torch.tensor(dataset.std))

    def spy(model, inputs, targets, **kwargs):
        assert torch.equal(inputs, unaugmented) and torch.equal(targets, dataset.train_labels)  # all, in order
        passes.append(real(model, inputs, targets, **kwargs).numpy())
        return torch.from_numpy(passes[-1])

    monkeypatch.setitem(experiment.EPOCH_FUNCTIONS, "correct", spy)
    scores = compute_scores(preset, dataset, Store(tmp_path / "runs"))
    assert len(passes) == 2 * 4  # every epoch of both runs, none at initialisation
    by_hand = np.stack([forgetting_scores(np.stack(passes[4 * k:4 * k + 4])) for k in range(2)])
    np.testing.assert_array_equal(scores["forgetting_runs"], by_hand)
    np.testing.assert_allclose(scores["forgetting"], by_hand.mean(0))
    assert not any(name.startswith("correct_at") for name in scores)  # the passes are not kept
    without = presets.with_overrides(tiny_digits, ["scores=el2n", "recipe.epochs=4", "scoring.num_runs=2"])
    assert "forgetting_epochs" in experiment.scores_config(preset, dataset)
    assert "forgetting_epochs" not in experiment.scores_config(without, dataset)  # others' keys do not change


def test_train_with_a_rule_the_preset_does_not_list_scores_what_the_rule_needs(tmp_path, capsys):
    from datadiet_nb.cli import main

    tiny = ["--set", "recipe.epochs=2", "--set", "scoring.num_runs=1", "--set", "scoring.epoch=1", "--set",
            "scoring.epochs.forgetting=2", "--set", "seeds=0", "--quiet", "--store", str(tmp_path / "runs")]
    assert main(["train", "--score", "forgetting", "--sparsity", "0.5", *tiny]) == 0  # digits lists the paper's rules
    [record] = Store(tmp_path / "runs").records()
    assert record["score"] == "forgetting" and record["num_kept"] == num_kept(897, 0.5)
    assert main(["prune", "--score", "el2n", "--sparsity", "0.5", *tiny]) == 0  # a listed rule: the preset as it is


def test_kept_indices_refuses_forgetting_for_a_preset_that_does_not_count_it(tiny_digits, tmp_path):
    dataset = load_dataset(tiny_digits)
    with pytest.raises(UserError, match="the rule 'forgetting' needs forgetting events"):
        kept_indices(tiny_digits, dataset, "forgetting", SPARSITY, 0, Store(tmp_path / "runs"))
