import math
import re

import pytest
import torch

from datadiet_nb import data, models, presets
from datadiet_nb.experiment import load_dataset, seeded_model
from datadiet_nb.train import Diverged, Recipe, TrainingState, lr_factor, predict, steps_per_epoch, total_steps, train


def test_step_schedule_follows_milestones():
    recipe = Recipe(epochs=200, schedule="step")
    total = 200 * 390
    assert lr_factor(recipe, 0, total) == 1.0
    assert lr_factor(recipe, 60 * 390 - 1, total) == 1.0
    assert lr_factor(recipe, 60 * 390, total) == pytest.approx(0.2)
    assert lr_factor(recipe, 160 * 390, total) == pytest.approx(0.2 ** 3)


def test_onecycle_and_cosine_shapes():
    onecycle, cosine = Recipe(schedule="onecycle", warmup=0.25), Recipe(schedule="cosine")
    factors = [lr_factor(onecycle, s, 100) for s in range(100)]
    assert max(factors) == pytest.approx(1.0) and factors.index(max(factors)) == 24
    assert factors[0] < 0.1 and factors[-1] < 0.02
    assert lr_factor(cosine, 0, 100) == 1.0 and lr_factor(cosine, 50, 100) == pytest.approx(0.5)


def test_budget_rule_keeps_steps_or_epochs():
    steps = Recipe(epochs=10, batch_size=100, budget="steps")
    epochs = Recipe(epochs=10, batch_size=100, budget="epochs")
    assert total_steps(steps, 500, 1000) == 100 == total_steps(steps, 1000, 1000)
    assert total_steps(epochs, 500, 1000) == 50
    assert steps_per_epoch(50, 100) == 1  # a subset smaller than a batch still trains


def test_step_budget_trains_the_same_number_of_steps_on_a_subset():
    ds = data.load("digits")
    recipe = Recipe(epochs=1, batch_size=64, lr=0.05, augment=False)
    model = models.build("smallcnn", num_classes=10, in_channels=1, width=4)
    result = train(model, ds, recipe, seed=0, indices=torch.arange(300))
    assert result.steps == ds.num_train // 64
    assert result.epochs == pytest.approx(result.steps / (300 // 64))


def test_cpu_training_is_deterministic_for_a_seed():
    preset = presets.with_overrides(presets.get("digits"), ["recipe.epochs=1", "scoring.epoch=1"])
    ds = load_dataset(preset)
    weights = []
    for seed in (0, 0, 1):
        model = seeded_model(preset, ds, seed)
        train(model, ds, preset.recipe, seed=seed)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_digits_trains_to_at_least_90_percent():
    preset = presets.get("digits")
    ds = load_dataset(preset)
    model = seeded_model(preset, ds, 0)
    train(model, ds, preset.recipe, seed=0)
    predictions = predict(model, ds.test_images, ds)
    assert predictions.shape == ds.test_labels.shape  # a prediction for every test example, in order
    assert (predictions == ds.test_labels).float().mean().item() >= 0.90


def _lr_at_every_step(monkeypatch) -> list[float]:
    """The learning rate of every optimiser step taken from now on (the first parameter group's)."""
    seen: list[float] = []
    real_step = torch.optim.SGD.step

    def step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    return seen


@pytest.mark.parametrize("schedule", ["onecycle", "step"])
def test_stop_epoch_keeps_the_full_schedule(schedule, monkeypatch):
    """"Scores at epoch t" are the model of a normal run after t passes: every step up to the stop has the full
    run's learning rate, and the weights at the stop equal the full run's after that pass."""
    ds = data.load("digits")
    recipe = Recipe(epochs=6, batch_size=64, lr=0.05, augment=False, schedule=schedule, milestones=(0.3, 0.6))
    per_epoch = steps_per_epoch(ds.num_train, 64)

    def fresh_model() -> torch.nn.Module:
        torch.manual_seed(0)
        return models.build("smallcnn", num_classes=10, in_channels=1, width=4)

    lrs = _lr_at_every_step(monkeypatch)
    full_model = fresh_model()
    at_epoch_2 = {}
    train(full_model, ds, recipe, seed=0,
          on_epoch=lambda e: e == 2 and at_epoch_2.update({k: v.clone() for k, v in full_model.state_dict().items()}))
    full_lrs = lrs[:]
    assert len(full_lrs) == 6 * per_epoch and len(set(full_lrs[:3 * per_epoch])) > 1
    lrs.clear()
    model = fresh_model()
    result = train(model, ds, recipe, seed=0, stop_epoch=3)
    assert result.steps == 3 * per_epoch and len(result.epoch_losses) == 3
    assert lrs == full_lrs[:3 * per_epoch]
    lrs.clear()
    model = fresh_model()
    train(model, ds, recipe, seed=0, stop_epoch=2)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, at_epoch_2[name]), name


def test_nan_loss_stops_the_run_with_a_clear_message():
    class Exploding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(64, 10)

        def forward(self, x):
            return self.linear(x.flatten(1)) * math.nan

    ds = data.load("digits")
    with pytest.raises(Diverged, match="nan"):
        train(Exploding(), ds, Recipe(epochs=1, batch_size=64, augment=False), seed=0)


class Interrupted(Exception):
    """Stands in for a kill: raised by the patched checkpoint writer after some saves."""


@pytest.mark.parametrize("survive", [1, 3])
def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(tmp_path, monkeypatch, survive):
    preset = presets.get("digits")
    ds = load_dataset(preset)
    recipe = Recipe(epochs=6, batch_size=64, lr=0.05, schedule="onecycle", augment=True)
    subset = torch.arange(0, ds.num_train, 2)
    whole = seeded_model(preset, ds, seed=3)
    reference = train(whole, ds, recipe, seed=3, indices=subset)

    checkpoint = tmp_path / "run.pt"
    real_save, saves = TrainingState.save, []

    def save_then_die(self, path, step, result):
        real_save(self, path, step, result)
        saves.append(step)
        if len(saves) == survive:
            raise Interrupted

    monkeypatch.setattr(TrainingState, "save", save_then_die)
    with pytest.raises(Interrupted):
        train(seeded_model(preset, ds, seed=3), ds, recipe, seed=3, indices=subset, checkpoint=checkpoint,
              checkpoint_every=1)
    monkeypatch.setattr(TrainingState, "save", real_save)
    resumed_model = seeded_model(preset, ds, seed=3)  # a new process would start from a fresh model
    resumed = train(resumed_model, ds, recipe, seed=3, indices=subset, checkpoint=checkpoint, checkpoint_every=1)
    assert resumed.steps == reference.steps and resumed.epoch_losses == reference.epoch_losses
    for name, tensor in whole.state_dict().items():
        assert torch.equal(tensor, resumed_model.state_dict()[name]), name


def test_a_checkpoint_of_another_run_or_a_broken_one_is_set_aside(tmp_path, caplog):
    preset = presets.get("digits")
    ds = load_dataset(preset)
    recipe = Recipe(epochs=2, batch_size=64, lr=0.05, augment=False)
    checkpoint = tmp_path / "run.pt"
    train(seeded_model(preset, ds, seed=0), ds, recipe, seed=0, checkpoint=checkpoint, checkpoint_every=1)
    assert checkpoint.is_file()
    reference = seeded_model(preset, ds, seed=1)
    expected = train(reference, ds, recipe, seed=1)
    model = seeded_model(preset, ds, seed=1)
    assert train(model, ds, recipe, seed=1, checkpoint=checkpoint).epoch_losses == expected.epoch_losses
    assert "belongs to another run" in caplog.text and (tmp_path / "run.pt.unusable").is_file()
    checkpoint.write_bytes(b"truncated")
    model = seeded_model(preset, ds, seed=1)
    assert train(model, ds, recipe, seed=1, checkpoint=checkpoint).epoch_losses == expected.epoch_losses


def test_onecycle_never_exceeds_the_base_lr_even_in_a_very_short_run():
    recipe = Recipe(schedule="onecycle", warmup=0.2)
    for total in (1, 2, 3, 7):
        assert max(lr_factor(recipe, s, total) for s in range(total)) <= 1.0


def test_epochs_budget_trains_that_many_passes_over_a_subset():
    ds = data.load("digits")
    recipe = Recipe(epochs=3, batch_size=64, lr=0.05, augment=False, budget="epochs")
    model = models.build("smallcnn", num_classes=10, in_channels=1, width=4)
    result = train(model, ds, recipe, seed=0, indices=torch.arange(300))
    assert result.steps == 3 * (300 // 64) and result.epochs == 3.0 and len(result.epoch_losses) == 3


@pytest.mark.parametrize("field, value, message", [
    ("epochs", -1, "epochs must be >= 0"), ("batch_size", 0, "batch sizes must be >= 1"),
    ("eval_batch_size", 0, "batch sizes must be >= 1"), ("schedule", "linear", "unknown lr schedule 'linear'"),
    ("decay", "bias", "unknown weight-decay rule 'bias'"), ("budget", "hours", "unknown budget rule 'hours'"),
    ("lr", 0.0, "lr must be > 0"), ("warmup", 1.0, "warmup in [0, 1)"), ("warmup", -0.1, "warmup in [0, 1)"),
])
def test_each_bad_recipe_field_is_one_user_error_before_any_training(field, value, message):
    import dataclasses

    from datadiet_nb.errors import UserError

    recipe = dataclasses.replace(Recipe(), **{field: value})
    model = models.build("smallcnn", num_classes=10, in_channels=1, width=4)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(UserError, match=re.escape(message)):
        train(model, data.load("digits"), recipe, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
