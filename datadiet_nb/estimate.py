"""How long a sweep will take: a few timed training, scoring and evaluation steps on this device, scaled up.

The estimate counts the optimiser steps each job will take under the preset's budget rule (final runs and
scoring runs each at their own recipe's measured step), the examples it scores and the test images it
evaluates, and multiplies each by its measured cost; a compiling recipe adds its compilation to every run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .backends import DevicePath
from .data import Dataset, normalize
from .experiment import scored_dataset, scoring_recipe, seeded_model
from .grad_norms import timed
from .presets import Preset
from .prune import num_kept
from .provenance import device_name, resolve_device
from .scores import SCORE_FUNCTIONS
from .sweep import Job
from .train import predict, run_steps, steps_per_epoch, train

TIMED_STEPS = 3  # optimiser steps timed after one untimed warm-up step


@dataclass(frozen=True)
class Costs:
    """Measured seconds per unit of work on one device."""

    device: str
    train_step: float  # one optimiser step of the final runs' recipe, as it runs (compiled when it compiles)
    score_example: float  # EL2N + GraNd of one training example
    eval_example: float  # one test prediction
    scoring_step: float = 0.0  # one optimiser step of the scoring recipe (its own batch size and compile setting)
    compile_run: float = 0.0  # compiling the final runs' step once more, as each run does in its own process
    compile_scoring: float = 0.0  # the same for the scoring recipe, where it compiles


def _step_costs(preset: Preset, dataset: Dataset, recipe, device) -> tuple[float, float]:
    """(seconds per optimiser step, seconds a run spends compiling it) of ``recipe`` on the device.

    A compiled step is timed after its warm-up; then dynamo's cache is cleared and the warm-up timed again,
    which is what each run pays in a fresh process (the inductor's on-disk cache already warm). An eager step
    compiles nothing.
    """
    model = seeded_model(preset, dataset, seed=0)
    one_pass = dataclasses.replace(recipe, epochs=1, budget="epochs")
    batch = min(recipe.batch_size, dataset.num_train)
    indices = torch.arange(batch * TIMED_STEPS) % dataset.num_train

    def warm_up() -> float:
        return timed(lambda: train(model, dataset, one_pass, seed=0, indices=torch.arange(batch), device=device),
                     device)[1]

    warm_up()
    steps = steps_per_epoch(len(indices), one_pass.batch_size)
    step = timed(lambda: train(model, dataset, one_pass, seed=0, indices=indices, device=device), device)[1] / steps
    if not DevicePath.of(device, recipe.compile).compile:
        return step, 0.0
    torch._dynamo.reset()
    return step, max(0.0, warm_up() - step)


def measure(preset: Preset, dataset: Dataset) -> Costs:
    """Time a few steps of each kind of work on the preset's device (seconds, about 5 steps' worth; a compiling
    recipe adds two compilations)."""
    device = resolve_device(preset.device)
    train_step, compile_run = _step_costs(preset, dataset, preset.recipe, device)
    if scoring_recipe(preset) == preset.recipe:
        scoring_step, compile_scoring = train_step, compile_run
    else:
        scoring_step, compile_scoring = _step_costs(preset, dataset, scoring_recipe(preset), device)

    model = seeded_model(preset, dataset, seed=0).to(device)
    count = min(preset.scoring.batch_size, dataset.num_train)
    inputs = normalize(dataset.train_images[:count], torch.tensor(dataset.mean), torch.tensor(dataset.std)).to(device)
    labels = dataset.train_labels[:count]

    def score_all():
        for score in SCORE_FUNCTIONS.values():
            score(model, inputs, labels, batch_size=count)

    score_all()
    score_example = timed(score_all, device)[1] / count
    test = dataset.test_images[:min(preset.recipe.eval_batch_size, len(dataset.test_images))]
    predict(model, test, dataset, batch_size=len(test), device=device)
    eval_example = timed(lambda: predict(model, test, dataset, batch_size=len(test), device=device), device)[1] / max(1, len(test))
    return Costs(device_name(device), train_step, score_example, eval_example, scoring_step, compile_run,
                 compile_scoring)


def job_seconds(preset: Preset, dataset: Dataset, job: Job, costs: Costs) -> float:
    """Estimated seconds of one job of the sweep on the measured device."""
    full = dataset.num_train
    if job.kind == "scores":
        return 0.0  # the mean of the K scoring runs' arrays
    if job.kind == "scoring-run":
        recipe, scored = scoring_recipe(preset), scored_dataset(preset, dataset).num_train
        scoring_steps = run_steps(recipe, scored, scored, stop_epoch=preset.scoring.last_epoch)
        trajectory = len(preset.scoring.trajectory) * scored * costs.eval_example  # EL2N: one forward pass
        return costs.compile_scoring + scoring_steps * costs.scoring_step + scored * costs.score_example + trajectory
    if job.size is not None:  # one training-set size of the grid
        full = len(dataset.with_train_per_class(job.size).train_labels)
    kept = num_kept(full, job.spec.sparsity)
    steps = run_steps(preset.recipe, kept, full)
    return costs.compile_run + steps * costs.train_step + len(dataset.test_labels) * costs.eval_example
