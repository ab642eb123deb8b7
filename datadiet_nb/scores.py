"""Per-example difficulty scores of Data Diet (Paul et al. 2021): EL2N and GraNd.

Every function scores one model in eval mode, on the inputs given (un-augmented, already
normalised), in their order: no shuffling and no dropped last batch, whatever the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backends import strict_fp32
from .errors import UserError
from .grad_norms import per_example_grad_norms
from .train import Recipe

SCORES = ("el2n", "grand")
SCORE_NAMES = {"el2n": "EL2N", "grand": "GraNd"}


PER_SEED_STRIDE = 100  # with per_seed, training seed t's scoring runs use seeds seed_offset + 100 t + k


@dataclass(frozen=True)
class Scoring:
    """How scores are taken: K = ``num_runs`` scoring runs trained with ``recipe`` (None: the preset's
    recipe), each score taken at its epoch (``epochs[score]``, else ``epoch``; 0 = initialisation), mean over runs.

    ``trajectory`` adds epochs at which each run's EL2N is also recorded, to show how the ranking
    settles (the stability section); ``full_train`` scores the whole training set even when the preset
    trains on a class-balanced subset of it; ``per_seed`` gives each training seed K scoring runs of its own,
    so that the scoring runs' variability reaches the intervals over seeds.
    """

    epoch: int = 20
    num_runs: int = 10
    batch_size: int = 256
    seed_offset: int = 1000  # scoring run k uses seed seed_offset + k, apart from the final runs' seeds
    recipe: Recipe | None = None
    epochs: dict[str, int] = field(default_factory=dict)
    trajectory: tuple[int, ...] = ()
    full_train: bool = False
    per_seed: bool = False  # each training seed prunes by K scoring runs of its own (see Preset.scoring_seeds)

    @property
    def seeds(self) -> list[int]:
        return [self.seed_offset + k for k in range(self.num_runs)]

    def epoch_of(self, score: str) -> int:
        """The epoch at which ``score`` is taken."""
        return self.epochs.get(score, self.epoch)

    @property
    def last_epoch(self) -> int:
        """How far each scoring run trains: the latest epoch any score or the trajectory needs."""
        return max([self.epoch_of(s) for s in SCORES] + list(self.trajectory))

    def label(self, score: str) -> str:
        """A score's name with its epoch, e.g. ``EL2N@20``; other rules (``random``) keep their name."""
        return f"{SCORE_NAMES[score]}@{self.epoch_of(score)}" if score in SCORES else score

    def validate(self) -> None:
        if self.num_runs < 1:
            raise UserError(f"the number of scoring runs K must be >= 1, got {self.num_runs}")
        if self.per_seed and self.num_runs > PER_SEED_STRIDE:
            raise UserError(f"scoring.per_seed gives each training seed at most {PER_SEED_STRIDE} scoring runs, "
                            f"got K = {self.num_runs}")
        unknown = sorted(set(self.epochs) - set(SCORES) - {"forgetting"})
        if unknown:
            raise UserError(f"scoring.epochs names unknown score {unknown[0]!r}; choose from {[*SCORES, 'forgetting']}")
        if min([self.epoch, *self.epochs.values(), *self.trajectory]) < 0:
            raise UserError("scoring epochs must be >= 0 (0 = at initialisation)")
        if self.batch_size < 1:
            raise UserError("scoring batch size must be >= 1")
        if self.recipe is not None:
            self.recipe.validate()


def _batched_eval(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int,
                  per_batch: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply ``per_batch`` to consecutive batches in eval mode and strict float32 (no TF32), restoring the model's
    mode after; the results are copied to the CPU once, at the end."""
    if len(inputs) != len(targets):
        raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        with strict_fp32():
            out = [per_batch(inputs[i:i + batch_size].to(device), targets[i:i + batch_size].to(device))
                   for i in range(0, len(inputs), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out).cpu() if out else torch.empty(0)


def el2n_scores(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """EL2N: ||softmax(f(x)) - onehot(y)||_2 for each row of ``inputs`` (the L2 norm, not its square)."""
    @torch.no_grad()
    def per_batch(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(x).float()
        error = F.softmax(logits, dim=1) - F.one_hot(y, logits.shape[1]).float()
        return error.pow(2).sum(1).sqrt()
    return _batched_eval(model, inputs, targets, batch_size, per_batch)


def grand_scores(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """GraNd: ||d loss(f(x), y) / d theta||_2 over ALL parameters, for each example on its own.

    Exact, from per-layer rules at about the cost of one forward + backward
    (:mod:`datadiet_nb.grad_norms`); models with other layer types use ``torch.func``.
    """
    return _batched_eval(model, inputs, targets, batch_size, lambda x, y: per_example_grad_norms(model, x, y))


def grand_last_layer_scores(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *,
                            batch_size: int = 256) -> torch.Tensor:
    """The common approximation of GraNd by the last linear layer only (weight and bias), for comparison.

    For a linear head z = W a + b with softmax cross-entropy, the per-example gradient is
    (p - y) a^T and (p - y), so its squared norm is ||p - y||^2 (||a||^2 + 1).
    """
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    features: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda module, args, output: features.append(args[0].detach()))

    @torch.no_grad()
    def per_batch(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        features.clear()
        logits = model(x).float()
        error = F.softmax(logits, 1) - F.one_hot(y, logits.shape[1]).float()
        a = features[0].float().flatten(1)
        return (error.pow(2).sum(1) * (a.pow(2).sum(1) + (1.0 if head.bias is not None else 0.0))).sqrt()
    try:
        return _batched_eval(model, inputs, targets, batch_size, per_batch)
    finally:
        hook.remove()


SCORE_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {"el2n": el2n_scores, "grand": grand_scores}


def correct_predictions(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *,
                        batch_size: int = 256) -> torch.Tensor:
    """1.0 where the model (eval mode) predicts an example's label, else 0.0: what forgetting events are counted on."""
    @torch.no_grad()
    def per_batch(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (model(x).float().argmax(1) == y).float()
    return _batched_eval(model, inputs, targets, batch_size, per_batch)


EPOCH_FUNCTIONS = {**SCORE_FUNCTIONS, "correct": correct_predictions}  # what a scoring run takes at an epoch


def forgetting_scores(correct) -> np.ndarray:
    """Forgetting events (Toneva et al., ICLR 2019) from ``correct`` [E, N]: whether each example was predicted
    right after each of E epochs. An event is right at one epoch and wrong at the next; an example never
    predicted right counts as E events, more than any learned example can have (at most E // 2)."""
    correct = np.asarray(correct, dtype=bool)
    events = (correct[:-1] & ~correct[1:]).sum(0).astype(np.float64)
    return np.where(correct.any(0), events, float(len(correct)))
