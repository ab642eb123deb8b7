"""One training run: SGD + Nesterov, an lr schedule per step, a budget rule for subsets, evaluation.

The data stay uint8 on the training device; each batch is normalised (and augmented) there, from a pass's
order and augmentation offsets drawn at once and copied once (no host sync per step). On CUDA the step runs
under bf16 autocast, on channels_last, compiled when the recipe asks (:class:`~datadiet_nb.backends.DevicePath`);
on CPU it is seeded and bit for bit reproducible at equal thread counts.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler
from . import progress as progress_bars
from .backends import DevicePath, configure_determinism, strict_fp32
from .data import Dataset, batch_indices, crop_flip, crop_flip_draws, normalize
from .errors import UserError
from .store import atomic_write_bytes

SCHEDULES = ("step", "onecycle", "cosine")
BUDGETS = ("steps", "epochs")
DECAY_RULES = ("weights", "all")
CHECKPOINTS_PER_RUN = 10  # default checkpoint interval: about a tenth of the run's passes

log = logging.getLogger("datadiet_nb")


@dataclass(frozen=True)
class Recipe:
    """Training hyper-parameters. Defaults are the Data Diet CIFAR recipe (200 epochs, lr 0.1 stepped x0.2)."""

    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    decay: str = "weights"  # decay "weights" (parameters of 2+ dims) or "all" (BatchNorm and biases too, as Data Diet's code)
    schedule: str = "step"  # "step" | "onecycle" (linear warm-up, linear decay) | "cosine"
    milestones: tuple[float, ...] = (0.3, 0.6, 0.8)  # step: fractions of the run where lr *= gamma
    gamma: float = 0.2
    warmup: float = 0.15  # onecycle: fraction of the steps spent rising to lr
    budget: str = "steps"  # a pruned subset trains for the full data's "steps" or for the same "epochs"
    augment: bool = True  # reflect-pad 4 + random crop + horizontal flip, on the device
    eval_batch_size: int = 1024
    compile: bool = False  # torch.compile the training step (the GPU path only: on CPU compiling costs more than it saves)

    def validate(self) -> None:
        if self.epochs < 0:
            raise UserError(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise UserError("batch sizes must be >= 1")
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown lr schedule {self.schedule!r}; choose one of {list(SCHEDULES)}")
        if self.decay not in DECAY_RULES:
            raise UserError(f"unknown weight-decay rule {self.decay!r}; choose one of {list(DECAY_RULES)}")
        if self.budget not in BUDGETS:
            raise UserError(f"unknown budget rule {self.budget!r}; choose one of {list(BUDGETS)}")
        if self.lr <= 0 or not 0 <= self.warmup < 1:
            raise UserError("lr must be > 0 and warmup in [0, 1)")


@dataclass
class TrainResult:
    steps: int
    epochs: float  # passes over the training subset
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    resumes: list[int] = field(default_factory=list)  # the steps at which the run resumed from its checkpoint
    path: dict = field(default_factory=dict)  # how the step ran (DevicePath: compiled, bf16 autocast, channels_last)


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


CHECKPOINT_KEYS = ("run", "step", "result", "model", "optimizer", "scheduler", "generator", "torch_rng")


@dataclass
class TrainingState:
    """Everything a run needs to continue exactly where it stopped: weights, optimiser, schedule, RNGs."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    run: dict  # identifies the run, so that a checkpoint of another run is never resumed

    def save(self, path: Path, step: int, result: TrainResult) -> None:
        buffer = io.BytesIO()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        torch.save({"run": self.run, "step": step, "result": asdict(result), "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
                    "cuda_rng": cuda_rng}, buffer)
        atomic_write_bytes(path, buffer.getvalue())

    def load(self, path: Path) -> tuple[int, TrainResult]:
        """Restore from ``path``; a checkpoint that cannot be read or is another run's is set aside: (0, fresh).

        Read onto the CPU (RNG states must stay CPU byte tensors; the model and optimiser copy their tensors to
        their own device) and checked whole before anything is restored; should restoring still fail, every
        part is put back as it was, so a run either resumes entirely or starts afresh untouched.
        """
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            check_checkpoint(saved, self)
        except Exception as error:  # truncated, edited, another run's, or from an incompatible version
            return self._set_aside(path, error)
        before = self._snapshot()
        try:
            self._restore(saved)
            result = TrainResult(**saved["result"])
        except Exception as error:
            self._restore(before)
            return self._set_aside(path, error)
        result.resumes.append(saved["step"])
        return saved["step"], result

    def _snapshot(self) -> dict:
        return {"model": copy.deepcopy(self.model.state_dict()), "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "scheduler": self.scheduler.state_dict(), "generator": self.generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None}

    def _restore(self, saved: dict) -> None:
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        if saved.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda_rng"])

    @staticmethod
    def _set_aside(path: Path, error: Exception) -> tuple[int, TrainResult]:
        target = path.with_name(path.name + ".unusable")
        os.replace(path, target)
        log.warning("checkpoint %s cannot be resumed (%s); moved to %s, starting the run afresh", path, error, target.name)
        return 0, TrainResult(steps=0, epochs=0.0)


def check_checkpoint(saved: dict, state: TrainingState) -> None:
    """Raise ValueError unless ``saved`` is a complete checkpoint of ``state``'s run that fits its model."""
    missing = [key for key in CHECKPOINT_KEYS if key not in saved]
    if missing:
        raise ValueError(f"it lacks {missing}")
    if saved["run"] != state.run:
        raise ValueError(f"it belongs to another run ({saved['run']})")
    expected = {name: tuple(t.shape) for name, t in state.model.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in saved["model"].items()}
    if found != expected:
        raise ValueError("its weights do not fit this model")
    for name in ("generator", "torch_rng"):
        if not (isinstance(saved[name], torch.Tensor) and saved[name].dtype == torch.uint8 and saved[name].device.type == "cpu"):
            raise ValueError(f"its {name} state is not a CPU byte tensor")
    if not set(TrainResult.__dataclass_fields__) >= set(saved["result"]):
        raise ValueError("its result has unknown fields")


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Batches per pass; the last incomplete batch is dropped (a batch of one breaks BatchNorm)."""
    return max(1, num_examples // batch_size)


def total_steps(recipe: Recipe, num_subset: int, num_full: int) -> int:
    """Optimiser steps of a run on ``num_subset`` of ``num_full`` examples under the recipe's budget rule."""
    reference = num_full if recipe.budget == "steps" else num_subset
    return recipe.epochs * steps_per_epoch(reference, recipe.batch_size)


def run_steps(recipe: Recipe, num_subset: int, num_full: int, stop_epoch: int | None = None) -> int:
    """Optimiser steps a run actually takes: the full budget, or up to pass ``stop_epoch`` (scoring runs)."""
    total = total_steps(recipe, num_subset, num_full)
    return total if stop_epoch is None else min(total, stop_epoch * steps_per_epoch(num_subset, recipe.batch_size))


def lr_factor(recipe: Recipe, step: int, total: int) -> float:
    """Multiplier of the base lr at ``step`` of ``total`` (the whole schedule, even when stopped early)."""
    progress = step / max(1, total)
    if recipe.schedule == "step":
        return recipe.gamma ** sum(progress >= m for m in recipe.milestones)
    if recipe.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if progress < recipe.warmup:
        return min(1.0, (progress + 1 / max(1, total)) / recipe.warmup)  # a run shorter than the warm-up peaks at 1
    return max(0.0, (1 - progress) / (1 - recipe.warmup))


def parameter_groups(model: nn.Module, recipe: Recipe) -> list[dict]:
    """SGD parameter groups: every parameter decayed (``decay="all"``), or 1-D ones (BatchNorm, biases) exempt."""
    params = list(model.parameters())
    if recipe.decay == "all":
        return [{"params": params, "weight_decay": recipe.weight_decay}]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": recipe.weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


@dataclass(frozen=True)
class Shard:
    """This process's part of a DistributedDataParallel run (see :mod:`datadiet_nb.distributed`)."""

    rank: int
    world_size: int


AUGMENT_SEED_STRIDE = 1 << 20  # rank r of a distributed run augments with seed + r * this: other draws per rank


def epoch_order(num: int, batch_size: int, generator: torch.Generator, shard: Shard | None,
                epoch: int, seed: int) -> tuple[torch.Tensor, int]:
    """One pass over ``range(num)``: the example order cut to whole batches, and the batch size.

    One process: a permutation drawn from the run's generator. A shard of a distributed run: its
    disjoint part of that pass (``DistributedSampler``, reshuffled per epoch with ``set_epoch``), in
    batches of ``batch_size / world_size``, so the global batch and the lr schedule stay the recipe's.
    """
    if shard is None:
        order, local = torch.randperm(num, generator=generator), batch_size
    else:
        sampler = DistributedSampler(range(num), num_replicas=shard.world_size, rank=shard.rank, shuffle=True,
                                     seed=seed, drop_last=True)
        sampler.set_epoch(epoch)
        order, local = torch.tensor(list(sampler), dtype=torch.int64), max(1, batch_size // shard.world_size)
    if len(order) < local:  # fewer examples than a batch: one short batch (as a batch of all of them)
        return order, len(order)
    return order[:len(order) - len(order) % local], local


def epoch_plan(order: torch.Tensor, generator: torch.Generator, augment: bool, device: torch.device) -> torch.Tensor:
    """A pass's order and, with ``augment``, its crop/flip draws, as one int64 [1 or 4, n] tensor on ``device``,
    copied there once (from pinned memory, without blocking, on CUDA)."""
    plan = torch.cat([order[None], crop_flip_draws(len(order), generator)]) if augment else order[None]
    if device.type == "cuda":
        return plan.pin_memory().to(device, non_blocking=True)
    return plan.to(device)


def train(model: nn.Module, dataset: Dataset, recipe: Recipe, *, seed: int, indices: torch.Tensor | None = None,
          device: torch.device | str = "cpu", stop_epoch: int | None = None, progress: bool = False,
          checkpoint: Path | None = None, checkpoint_every: int = 0,
          on_epoch: Callable[[int], None] | None = None, shard: Shard | None = None) -> TrainResult:
    """Train ``model`` in place on ``dataset.train_images[indices]`` (all when None).

    ``stop_epoch`` ends the run after that many passes while keeping the full run's lr schedule
    (scoring runs take their model at epoch t of a normal run). Raises :class:`Diverged` on NaN loss.
    With ``checkpoint``, the whole training state is saved there every ``checkpoint_every`` passes
    (0: about every tenth of the run), and a run that finds one resumes from it; on CPU the result
    equals an uninterrupted run's bit for bit. The caller deletes it once the result is stored.
    ``on_epoch(e)`` is called after each complete pass ``e`` (1, 2, ...), before that pass's checkpoint,
    so whatever it saves survives an interruption (scoring runs score there). With ``shard``, this
    process is one rank of a DistributedDataParallel run (process group initialised by the caller):
    it trains on its part of each pass and gradients are averaged over ranks; ``checkpoint`` is then
    this rank's own file.
    """
    recipe.validate()
    device = torch.device(device)
    if device.type == "cuda":
        configure_determinism()
    path = DevicePath.of(device, recipe.compile)
    indices = torch.arange(dataset.num_train) if indices is None else torch.as_tensor(indices, dtype=torch.int64)
    images = dataset.train_images[indices].to(device)
    labels = dataset.train_labels[indices].to(device)
    mean, std = (torch.tensor(v, device=device) for v in (dataset.mean, dataset.std))

    total = total_steps(recipe, len(indices), dataset.num_train)
    per_epoch = (steps_per_epoch(len(indices), recipe.batch_size) if shard is None else
                 steps_per_epoch(len(indices) // shard.world_size, max(1, recipe.batch_size // shard.world_size)))
    last_step = run_steps(recipe, len(indices), dataset.num_train, stop_epoch)

    model.to(device, memory_format=path.memory_format).train()
    optimizer = torch.optim.SGD(parameter_groups(model, recipe), lr=recipe.lr, momentum=recipe.momentum,
                                nesterov=recipe.nesterov)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(recipe, s, total))
    forward = model
    if shard is not None:  # DDP outside compile, so that its all-reduce overlaps the compiled backward
        forward = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if path.compile:  # one batch size throughout (the last short batch is dropped): one graph
        forward = torch.compile(forward)
    generator = torch.Generator().manual_seed(seed + (shard.rank * AUGMENT_SEED_STRIDE if shard else 0))

    run = {"seed": seed, "steps": last_step, "examples": len(indices)}
    if shard is not None:  # a rank's checkpoint resumes only the same rank of a run split the same way
        run.update(rank=shard.rank, world_size=shard.world_size)
    state = TrainingState(model, optimizer, scheduler, generator, run=run)
    result, step = TrainResult(steps=0, epochs=0.0), 0
    if checkpoint is not None and checkpoint.is_file():
        step, result = state.load(checkpoint)
    result.path = path.describe()
    every = checkpoint_every or max(1, round(math.ceil(last_step / per_epoch) / CHECKPOINTS_PER_RUN))
    started = time.perf_counter() - result.seconds
    bar = progress_bars.bar(enabled=progress, total=last_step, initial=step, desc="train", unit="step", leave=False)
    while step < last_step:
        loss_sum = torch.zeros((), device=device)
        batches = 0
        order, local = epoch_order(len(indices), recipe.batch_size, generator, shard, len(result.epoch_losses), seed)
        plan = epoch_plan(order, generator, recipe.augment, device)
        for start in range(0, len(order), local):
            if step >= last_step:
                break
            batch = plan[0, start:start + local]
            x = normalize(images[batch], mean, std)
            if recipe.augment:
                x = crop_flip(x, plan[1:, start:start + local])
            x = x.contiguous(memory_format=path.memory_format)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=path.autocast):
                loss = F.cross_entropy(forward(x), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach()
            batches += 1
            step += 1
            bar.update()
        if shard is not None:  # every rank sees the mean over all ranks, so all stop together if it diverged
            torch.distributed.all_reduce(loss_sum)
            loss_sum /= shard.world_size
        epoch_loss = (loss_sum / max(1, batches)).item()
        if not math.isfinite(epoch_loss):
            bar.close()
            raise Diverged(f"training loss became {epoch_loss} at step {step} (seed {seed}, lr {recipe.lr})")
        result.epoch_losses.append(epoch_loss)
        result.epochs += batches / per_epoch
        if on_epoch is not None and batches == per_epoch:
            on_epoch(len(result.epoch_losses))
        if checkpoint is not None and step < last_step and len(result.epoch_losses) % every == 0:
            result.seconds = time.perf_counter() - started
            state.save(checkpoint, step, result)
    bar.close()
    result.steps, result.seconds = step, time.perf_counter() - started
    return result


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, dataset: Dataset, *, batch_size: int = 1024,
            device: torch.device | str = "cpu") -> torch.Tensor:
    """Predicted class of every image (uint8, normalised with the dataset's constants), in order, eval mode.

    Always strict IEEE float32 (no autocast, no TF32, also on CUDA): a borderline argmax must not flip with the
    precision.
    """
    device = torch.device(device)
    mean, std = (torch.tensor(v, device=device) for v in (dataset.mean, dataset.std))
    was_training = model.training
    model.to(device).eval()
    predictions = []
    with strict_fp32():
        for batch in batch_indices(len(images), batch_size):
            x = normalize(images[batch].to(device), mean, std)
            predictions.append(model(x).float().argmax(1))
    predictions = [p.cpu() for p in predictions]  # one sync at the end, not one per batch
    model.train(was_training)
    return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.int64)
