"""The fast GPU presets: valid paper studies whose model and recipe train, checked on CPU without CIFAR files."""

import dataclasses

import pytest
import torch

from datadiet_nb import models, presets
from datadiet_nb.data import Dataset
from datadiet_nb.train import train

FAST_PRESETS = ("cifar10-resnet18-fast", "cifar100-resnet50-fast")
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
IMAGE_SHAPE = (3, 32, 32)
TINY_BATCH = 4  # one optimiser step on CPU: a batch this size, and exactly this many images


def random_dataset(num_classes: int, num_images: int, seed: int = 0) -> Dataset:
    """Random uint8 images of CIFAR's shape, labelled 0..num_classes-1, for both splits."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (num_images, *IMAGE_SHAPE), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, num_classes, (num_images,), generator=g)
    return Dataset("random", images, labels, images, labels, tuple(map(str, range(num_classes))),
                   (0.5,) * 3, (0.25,) * 3)


@pytest.mark.parametrize("name", FAST_PRESETS)
def test_fast_preset_is_the_paper_study_on_a_shorter_recipe(name):
    preset = presets.get(name).validate()
    assert preset.recipe.schedule == "onecycle" and preset.recipe.compile and preset.recipe.epochs <= 50
    assert preset.scoring.num_runs == 10 and preset.seeds == (0, 1, 2) and preset.device == "auto"
    assert preset.scores == presets.PAPER_RULES and preset.sparsities == presets.PAPER_SPARSITIES
    # scores come from the paper's own scoring recipe (batch 128, lr 0.1, epoch 20, K = 10), not the fast one
    scoring = preset.scoring.recipe
    assert (scoring.batch_size, scoring.lr, scoring.epochs, scoring.schedule) == (128, 0.1, 200, "step")
    assert preset.scoring.epoch_of("el2n") == preset.scoring.epoch_of("grand") == 20
    assert preset.recipe.decay == scoring.decay == "all"


@pytest.mark.parametrize("name", ["cifar10-resnet18", "cifar100-resnet50", *FAST_PRESETS])
def test_paper_presets_decay_every_parameter_and_zero_init_resnet50(name):
    preset = presets.get(name)
    assert preset.recipe.decay == "all" and preset.scoring.recipe.decay == "all"
    assert preset.model_options.get("zero_init_residual", False) == (preset.model == "resnet50")


@pytest.mark.parametrize("name", FAST_PRESETS)
def test_fast_preset_model_trains_one_step_on_cpu(name):
    preset = presets.get(name)
    dataset = random_dataset(NUM_CLASSES[preset.dataset], TINY_BATCH)
    torch.manual_seed(0)
    model = models.build(preset.model, num_classes=dataset.num_classes, **preset.model_options)
    before = [p.detach().clone() for p in model.parameters()]
    recipe = dataclasses.replace(preset.recipe, epochs=1, batch_size=TINY_BATCH)
    result = train(model, dataset, recipe, seed=0, device="cpu")
    assert result.steps == 1 and all(torch.isfinite(torch.tensor(result.epoch_losses)))
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_cifar10_cpu_scores_the_full_set_and_trains_a_three_seed_grid():
    preset = presets.get("cifar10-cpu").validate()
    assert preset.scoring.full_train and preset.scoring.num_runs >= 2 and len(preset.seeds) >= 3
    assert len([s for s in preset.sparsities if s > 0]) >= 4 and preset.train_per_class is not None
    # scores from the end of the scoring runs' own annealed schedule, not an early checkpoint
    assert preset.scoring.epoch_of("el2n") == preset.scoring.epoch_of("grand") == preset.scoring.recipe.epochs


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_every_built_in_preset_has_three_seeds(name):
    assert len(presets.get(name).seeds) >= 3
