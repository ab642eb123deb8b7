"""Complete, named study configs, and validation of user edits to them (``--set key=value``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from . import data, models
from .errors import UserError
from .prune import check_sparsity
from .scores import Scoring
from .train import Recipe

PRUNING_SCORES = ("el2n", "grand", "random")
DENSE = "dense"  # the score label of a sparsity-0 run: every example kept, whatever the score
PAPER_SPARSITIES = tuple(round(0.1 * i, 1) for i in range(10))
SHARED_CIFAR10_ZIP = "../shared/data/cifar10.zip"


@dataclass(frozen=True)
class Preset:
    """One study: dataset, model, training recipe, scoring, and the grid of scores x sparsities x seeds."""

    name: str
    dataset: str
    model: str
    model_options: dict = field(default_factory=dict)
    recipe: Recipe = Recipe()
    scoring: Scoring = Scoring()
    scores: tuple[str, ...] = PRUNING_SCORES
    sparsities: tuple[float, ...] = PAPER_SPARSITIES
    seeds: tuple[int, ...] = (0,)
    offset: float = 0.0
    train_per_class: int | None = None  # class-balanced subset of the training set (first n of each class)
    device: str = "auto"

    def validate(self) -> "Preset":
        data.check_name(self.dataset)
        models.check_name(self.model)
        self.recipe.validate()
        self.scoring.validate()
        unknown = [s for s in self.scores if s not in PRUNING_SCORES]
        if unknown:
            raise UserError(f"unknown score {unknown[0]!r}; choose from {list(PRUNING_SCORES)}")
        if not self.sparsities or not self.seeds:
            raise UserError("a preset needs at least one sparsity and one seed")
        for sparsity in self.sparsities:
            check_sparsity(sparsity, self.offset)
        if self.train_per_class is not None and self.train_per_class < 1:
            raise UserError(f"train_per_class must be >= 1, got {self.train_per_class}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset(
        name="digits", dataset="digits", model="smallcnn", model_options={"width": 16},
        recipe=Recipe(epochs=15, batch_size=64, lr=0.05, schedule="onecycle", augment=False),
        scoring=Scoring(epoch=2, num_runs=4), sparsities=(0.0, 0.1, 0.3, 0.5, 0.7, 0.9), seeds=(0,),
        device="cpu",
    ),
    Preset(name="cifar10-resnet18", dataset="cifar10", model="resnet18", seeds=(0, 1, 2)),
    Preset(name="cifar100-resnet50", dataset="cifar100", model="resnet50", seeds=(0, 1, 2)),
    Preset(
        name="cifar10-mini", dataset=f"imagefolder:{SHARED_CIFAR10_ZIP}", model="resnet18",
        model_options={"width": 8}, train_per_class=500,
        recipe=Recipe(epochs=8, batch_size=128, lr=0.1, schedule="onecycle"),
        scoring=Scoring(epoch=2, num_runs=4), sparsities=(0.0, 0.3, 0.5, 0.7, 0.9), seeds=(0,),
    ),
]}


def get(name: str) -> Preset:
    """A preset by name, or a one-line error listing the known ones."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def _parse(text: str, like, key: str):
    """Parse ``text`` into the type of the current value ``like``."""
    try:
        if isinstance(like, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if isinstance(like, tuple):
            kind = type(like[0]) if like else float
            return tuple(_parse(t.strip(), kind(), key) for t in text.split(",") if t.strip())
        if like is None:  # optional int (train_per_class)
            return None if text.lower() in ("none", "") else int(text)
        if isinstance(like, int) and text.lower() == "none":
            return None
        return type(like)(text)
    except ValueError:
        raise UserError(f"--set {key}={text}: expected {type(like).__name__}") from None


def with_overrides(preset: Preset, assignments: list[str]) -> Preset:
    """Apply ``key=value`` edits (dotted for nested fields, e.g. ``recipe.epochs=5``) and validate."""
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep:
            raise UserError(f"--set expects key=value, got {assignment!r}")
        head, _, rest = key.strip().partition(".")
        if head not in {f.name for f in dataclasses.fields(Preset)} or head == "name":
            raise UserError(f"unknown preset key {key!r}")
        current = getattr(preset, head)
        if head == "model_options" and rest:
            like = current.get(rest, 0)
            value = {**current, rest: _parse(text, like, key)}
        elif dataclasses.is_dataclass(current) and rest:
            names = {f.name for f in dataclasses.fields(current)}
            if rest not in names:
                raise UserError(f"unknown preset key {key!r}; {head} has {sorted(names)}")
            value = dataclasses.replace(current, **{rest: _parse(text, getattr(current, rest), key)})
        elif rest or dataclasses.is_dataclass(current) or isinstance(current, dict):
            raise UserError(f"unknown preset key {key!r}")
        else:
            value = _parse(text.strip(), current, key)
        preset = dataclasses.replace(preset, **{head: value})
    return preset.validate()
