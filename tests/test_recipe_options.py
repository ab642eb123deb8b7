"""The original recipe's details as options, and scores taken the way the paper takes them."""

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from datadiet_nb import experiment, models, presets, train as train_module
from datadiet_nb.experiment import compute_scores, load_dataset, scores_config
from datadiet_nb.store import Store, config_key
from datadiet_nb.train import Recipe, parameter_groups, predict


def test_decay_all_decays_batchnorm_and_biases_and_weights_skips_them():
    model = models.build("resnet18", num_classes=10, width=4)
    one_d = {id(p) for p in model.parameters() if p.ndim == 1}
    assert one_d, "the model has BatchNorm scales and a bias"
    (group,) = parameter_groups(model, Recipe(decay="all"))
    assert group["weight_decay"] == 5e-4 and len(group["params"]) == len(list(model.parameters()))
    decayed, exempt = parameter_groups(model, Recipe(decay="weights"))
    assert {id(p) for p in exempt["params"]} == one_d and exempt["weight_decay"] == 0.0
    assert not one_d & {id(p) for p in decayed["params"]}


def test_decay_all_shrinks_a_batchnorm_scale_that_has_no_gradient():
    """With lr 1 and no loss gradient on the BN scale (the sample is constant), only decay moves it."""
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(2, 1, 2, 2))
    for rule, expect_change in (("all", True), ("weights", False)):
        bn = model[1]
        bn.weight.data.fill_(1.0)
        optimizer = torch.optim.SGD(parameter_groups(model, Recipe(decay=rule, weight_decay=0.1)), lr=1.0)
        optimizer.zero_grad()
        bn.weight.grad = torch.zeros_like(bn.weight)
        optimizer.step()
        assert (not torch.allclose(bn.weight, torch.ones(2))) == expect_change


@pytest.mark.parametrize("name,blocks", [("resnet18", 8), ("resnet50", 16)])
def test_zero_init_residual_zeroes_the_last_batchnorm_scale_of_every_block(name, blocks):
    torch.manual_seed(0)
    plain = models.build(name, num_classes=10, width=4)
    torch.manual_seed(0)
    zeroed = models.build(name, num_classes=10, width=4, zero_init_residual=True)
    last = [block.last_bn.weight for block in zeroed.stages]
    assert len(last) == blocks and all(torch.all(w == 0) for w in last)
    changed = [k for k, v in zeroed.state_dict().items() if not torch.equal(v, plain.state_dict()[k])]
    assert len(changed) == blocks, "only the last BN scale of each block differs (same random draws otherwise)"


def test_predict_never_uses_autocast(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("predict entered torch.autocast")
    monkeypatch.setattr(torch, "autocast", refuse)
    from datadiet_nb.data import Dataset
    images = torch.randint(0, 256, (5, 1, 4, 4), dtype=torch.uint8)
    labels = torch.zeros(5, dtype=torch.int64)
    dataset = Dataset("t", images, labels, images, labels, ("a", "b"), (0.5,), (0.25,))
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    assert predict(model, images, dataset).shape == (5,)


def test_scoring_recipe_and_epochs_change_the_key_and_the_scores(tiny_digits, tmp_path, monkeypatch):
    base = presets.with_overrides(tiny_digits, ["scoring.trajectory="])
    store, dataset = Store(tmp_path), load_dataset(base)
    keys = {config_key(scores_config(p, dataset)) for p in [
        base, presets.with_overrides(base, ["scoring.recipe.lr=0.2"]),
        presets.with_overrides(base, ["scoring.epochs.grand=0"]), presets.with_overrides(base, ["recipe.decay=all"])]}
    assert len(keys) == 4
    stopped = []
    real_train = experiment.train
    monkeypatch.setattr(experiment, "train", lambda *a, **k: (stopped.append((a[2], k["stop_epoch"])),
                                                               real_train(*a, **k))[1])
    own = presets.with_overrides(base, ["scoring.recipe.epochs=3", "scoring.recipe.lr=0.02"])
    compute_scores(own, dataset, store)
    assert stopped == [(own.scoring.recipe, 1)], "scoring runs train on the scoring recipe, to the scoring epoch"


def test_each_score_is_taken_at_its_own_epoch(tiny_digits, tmp_path):
    """GraNd@0 equals GraNd of the untrained model; EL2N@1 equals EL2N after one epoch, from the same run."""
    at_init = presets.with_overrides(tiny_digits, ["scoring.epoch=0", "scoring.trajectory="])
    mixed = presets.with_overrides(tiny_digits, ["scoring.epochs.grand=0", "scoring.trajectory=0,1"])
    assert mixed.scoring.label("grand") == "GraNd@0" and mixed.scoring.label("el2n") == "EL2N@1"
    dataset = load_dataset(tiny_digits)
    init_scores = compute_scores(at_init, dataset, Store(tmp_path / "a"))
    one_epoch = compute_scores(tiny_digits, dataset, Store(tmp_path / "b"))
    got = compute_scores(mixed, dataset, Store(tmp_path / "c"))
    np.testing.assert_array_equal(got["grand"], init_scores["grand"])
    np.testing.assert_array_equal(got["el2n"], one_epoch["el2n"])
    np.testing.assert_array_equal(got["el2n_at0_runs"], init_scores["el2n_runs"])
    np.testing.assert_array_equal(got["el2n_at1_runs"], one_epoch["el2n_runs"])


def test_a_score_epoch_beyond_the_scoring_recipe_is_refused(tiny_digits):
    with pytest.raises(Exception, match="scoring recipe trains 2 epochs"):
        presets.with_overrides(tiny_digits, ["scoring.epochs.el2n=5"])


def test_full_train_scoring_scores_the_whole_set_and_prunes_within_the_subset(tiny_digits, tmp_path):
    preset = presets.with_overrides(tiny_digits, ["train_per_class=20", "scoring.full_train=true",
                                                  "scoring.trajectory="])
    dataset = load_dataset(preset)
    scores = compute_scores(preset, dataset, Store(tmp_path))
    assert dataset.num_train == 200 and scores["el2n"].shape == (dataset.full.num_train,)
    kept = experiment.kept_indices(preset, dataset, "el2n", 0.5, 0, Store(tmp_path))
    subset_scores = scores["el2n"][dataset.source_indices.numpy()]
    assert len(kept) == 100 and subset_scores[kept].min() >= np.delete(subset_scores, kept).max()


def test_a_sweep_on_a_subset_with_full_set_scores_sees_its_scores_done(tiny_digits, tmp_path):
    from datadiet_nb.sweep import run_sweep, status
    preset = presets.with_overrides(tiny_digits, ["train_per_class=20", "scoring.full_train=true",
                                                  "scoring.trajectory=", "scores=el2n"])
    store = Store(tmp_path)
    outcome = run_sweep(preset, store, progress=False)
    assert not outcome.failures and len(outcome.records) == 2
    assert {state for _, state, _ in status(preset, store)} == {"done"}
    assert not (tmp_path / "corrupt").exists(), "full-set scores are not mistaken for corrupt ones"
