"""Complete, named study configs, and validation of user edits to them (``--set key=value``)."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from . import data, models
from .errors import UserError
from .prune import OFFSET_RULES, RULES, check_sparsity
from .scores import PER_SEED_STRIDE, Scoring
from .train import Recipe

PAPER_RULES = ("el2n", "grand", "random")  # what the paper compares; a preset's default
PRUNING_SCORES = tuple(RULES)  # every rule a preset may name (see prune.RULES)
# the rules of the bias chapter: every rule that keeps hard examples or none in particular (not the easy ones)
BIAS_RULES = tuple(rule for rule in PRUNING_SCORES if not rule.endswith("-easy"))
# the regime chapter's: keep the hardest, keep the easiest, uniform, and the hard rule's class counts at random
REGIME_RULES = ("el2n", "el2n-easy", "random", "el2n-matched")
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
    scores: tuple[str, ...] = PAPER_RULES
    sparsities: tuple[float, ...] = PAPER_SPARSITIES
    seeds: tuple[int, ...] = (0,)
    offset: float = 0.0
    train_per_class: int | None = None  # class-balanced subset of the training set (first n of each class)
    train_sizes: tuple[int, ...] = ()  # a grid axis of training-set sizes (per class), instead of train_per_class
    device: str = "auto"
    checkpoint_epochs: int = 0  # save a resumable checkpoint every this many passes (0: about a tenth of a run)
    ccs_beta: float = 0.1  # CCS: the hardest fraction cut before stratified sampling
    ccs_bins: int = 50  # CCS: equal-width score strata

    def validate(self) -> "Preset":
        data.check_name(self.dataset)
        models.check_name(self.model)
        self.recipe.validate()
        self.scoring.validate()
        unknown = [s for s in self.scores if s not in PRUNING_SCORES]
        if unknown:
            raise UserError(f"unknown score {unknown[0]!r}; choose from {list(PRUNING_SCORES)}")
        no_offset = [s for s in self.scores if s not in OFFSET_RULES + ("random",)]  # random ignores it, as always
        if self.offset and no_offset:
            raise UserError(f"an offset applies only to the rules {list(OFFSET_RULES)}, not {no_offset}")
        if "ccs" in self.scores:
            if not 0 <= self.ccs_beta < 1 or self.ccs_bins < 1:
                raise UserError(f"ccs_beta must be in [0, 1) and ccs_bins >= 1, got {self.ccs_beta:g}, {self.ccs_bins}")
            if any(0 < s < self.ccs_beta for s in self.sparsities):
                raise UserError(f"ccs with ccs_beta={self.ccs_beta:g} cuts more than sparsity "
                                f"{min(s for s in self.sparsities if s > 0):g} removes; lower ccs_beta")
        if not self.sparsities or not self.seeds:
            raise UserError("a preset needs at least one sparsity and one seed")
        if self.scoring.per_seed and min(self.seeds) < 0:
            raise UserError(f"scoring.per_seed needs seeds >= 0 (each names its own scoring runs), got {min(self.seeds)}")
        for sparsity in self.sparsities:
            check_sparsity(sparsity, self.offset_at(sparsity))
        if self.train_per_class is not None and self.train_per_class < 1:
            raise UserError(f"train_per_class must be >= 1, got {self.train_per_class}")
        if self.train_sizes:
            if self.train_per_class is not None:
                raise UserError(f"set train_per_class or train_sizes, not both (got {self.train_per_class} and "
                                f"{','.join(map(str, self.train_sizes))})")
            if min(self.train_sizes) < 1 or len(set(self.train_sizes)) != len(self.train_sizes):
                raise UserError(f"train_sizes must be distinct sizes >= 1, got {','.join(map(str, self.train_sizes))}")
            if not self.scoring.full_train and any(RULES[s] is not None for s in self.scores):
                raise UserError("train_sizes needs scoring.full_train=true: every size prunes by the same scores "
                                "of the full training set")
        scoring_epochs = (self.scoring.recipe or self.recipe).epochs
        if "forgetting" in self.scores and self.scoring.epoch_of("forgetting") < 1:
            raise UserError("forgetting events are counted over at least 1 epoch (scoring.epochs.forgetting >= 1)")
        if "forgetting" in self.scores and self.scoring.epoch_of("forgetting") > scoring_epochs:
            raise UserError(f"forgetting is counted over {self.scoring.epoch_of('forgetting')} epochs but the scoring "
                            f"recipe trains {scoring_epochs} epochs")
        if self.scoring.last_epoch > scoring_epochs:
            raise UserError(f"scores are taken at epoch {self.scoring.last_epoch} but the scoring recipe trains "
                            f"{scoring_epochs} epochs")
        if self.checkpoint_epochs < 0:
            raise UserError(f"checkpoint_epochs must be >= 0, got {self.checkpoint_epochs}")
        return self

    def scoring_seeds(self) -> list[int]:
        """The seeds of every scoring run: the K of ``scoring.seeds``, or with ``scoring.per_seed`` the K of each
        training seed (:meth:`scoring_seeds_of`), training seed by training seed."""
        if not self.scoring.per_seed:
            return self.scoring.seeds
        return [seed for training_seed in self.seeds for seed in self.scoring_seeds_of(training_seed)]

    def scoring_seeds_of(self, training_seed: int) -> list[int]:
        """The seeds of the scoring runs whose mean prunes the runs of ``training_seed``: all of them, or with
        ``scoring.per_seed`` its own K, ``seed_offset + PER_SEED_STRIDE * training_seed + k``."""
        if not self.scoring.per_seed:
            return self.scoring.seeds
        first = self.scoring.seed_offset + PER_SEED_STRIDE * training_seed
        return [first + k for k in range(self.scoring.num_runs)]

    def offset_at(self, sparsity: float) -> float:
        """The offset a run at ``sparsity`` uses: none for the dense run, which keeps every example."""
        return self.offset if sparsity else 0.0

    def at_size(self, per_class: int) -> "Preset":
        """The study at one of its training-set sizes: ``per_class`` training examples of each class."""
        return dataclasses.replace(self, train_per_class=per_class, train_sizes=())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# A GPU recipe for the paper's final runs in a fifth to a quarter of its 200 epochs: batch 512, one-cycle to
# lr 0.4 (the paper's 0.1 at batch 128, scaled with the batch) with a fifth of the run as warm-up, Nesterov,
# weight decay 5e-4 on every parameter, crop + flip, bf16, torch.compile. Aimed at >= 94.5 % for ResNet-18
# on CIFAR-10 in 40 epochs and >= 76 % for ResNet-50 on CIFAR-100 in 50 (not yet measured: no GPU run so far).
FAST_RECIPE = Recipe(batch_size=512, lr=0.4, schedule="onecycle", warmup=0.2, compile=True, decay="all")
# The paper's recipe as Data Diet's code runs it: 200 epochs of batch 128, lr 0.1 stepped x0.2 at 30/60/80 %,
# weight decay on every parameter (BatchNorm and biases too).
PAPER_RECIPE = Recipe(decay="all")
# The paper's scoring: K = 10 runs of the paper's recipe, scores taken at epoch 20 of its schedule.
PAPER_SCORING = Scoring(epoch=20, num_runs=10, recipe=PAPER_RECIPE)
RESNET50_OPTIONS = {"zero_init_residual": True}  # Data Diet's ResNet-50 zero-initialises each block's last BN scale


def fast_paper_preset(name: str, dataset: str, model: str, *, epochs: int, model_options: dict | None = None
                      ) -> Preset:
    """The paper's study (K = 10 scoring runs, 3 seeds, every score and sparsity): scores from the paper's own
    scoring recipe (the fast recipe's epoch 4 of 40 is about one paper epoch in the linear-scaling sense, not
    twenty), final runs on :data:`FAST_RECIPE`."""
    return Preset(name=name, dataset=dataset, model=model, model_options=model_options or {},
                  recipe=dataclasses.replace(FAST_RECIPE, epochs=epochs), scoring=PAPER_SCORING, seeds=(0, 1, 2))


# cifar10-cpu: real CIFAR-10 on a 2-core CPU. The full 50,000 images are scored by K = 3 narrow ResNet-18s,
# each trained to the end of a 4-epoch one-cycle run (an annealed model ranks stably; an early checkpoint
# of a short run mostly reflects its transient class errors). The grid trains on the first 500 images of
# each class, pruned by those scores restricted to it.
CIFAR10_CPU_SCORING = Scoring(epoch=4, num_runs=3, batch_size=500, trajectory=(1, 2, 3), full_train=True,
                              recipe=Recipe(epochs=4, batch_size=128, lr=0.1, schedule="onecycle", warmup=0.25))
CIFAR10_CPU_RECIPE = Recipe(epochs=15, batch_size=128, lr=0.1, schedule="onecycle")

# digits: the embedded default, in seconds on a CPU. 90 test images per class (one image is 1.1 points of a
# class's accuracy) and a small CNN of width 4 trained 10 epochs: about 95 % dense accuracy, with classes 1, 8
# and 9 behind, so the spread of class accuracies is measurable above test-set noise (a width-16 model reaches
# 98-99 % and leaves no spread to study). 5 seeds, each pruned by K = 4 scoring runs of its own, so that the
# intervals over seeds count the scoring runs' variability too.
DIGITS = Preset(
    name="digits", dataset="digits", model="smallcnn", model_options={"width": 4},
    recipe=Recipe(epochs=10, batch_size=64, lr=0.05, schedule="onecycle", augment=False),
    scoring=Scoring(epoch=2, num_runs=4, trajectory=(0, 1), per_seed=True),
    sparsities=(0.0, 0.1, 0.3, 0.5, 0.7, 0.9), seeds=(0, 1, 2, 3, 4), device="cpu",
)
# Every pruning rule side by side on digits (the bias chapter). Trimmed to 4 sparsities so that `make report`
# stays within 5 minutes; forgetting is counted over the whole scoring run (the recipe's 10 epochs).
DIGITS_BIAS = dataclasses.replace(
    DIGITS, name="digits-bias", scores=BIAS_RULES, sparsities=(0.0, 0.3, 0.5, 0.7),
    scoring=dataclasses.replace(DIGITS.scoring, epochs={"forgetting": DIGITS.recipe.epochs}))

CIFAR10_CPU = Preset(
    name="cifar10-cpu", dataset=f"imagefolder:{SHARED_CIFAR10_ZIP}", model="resnet18",
    model_options={"width": 8}, train_per_class=500, recipe=CIFAR10_CPU_RECIPE, scoring=CIFAR10_CPU_SCORING,
    sparsities=(0.0, 0.3, 0.5, 0.7, 0.9), seeds=(0, 1, 2),
)
# The bias chapter on real CIFAR-10 (about an hour on 2 cores): every rule but forgetting at half sparsity,
# 5 seeds. It shares cifar10-cpu's scoring runs (which take EL2N and GraNd) and its runs; forgetting would score
# the 50,000 images again, counting each example's predictions after every epoch.
CIFAR10_CPU_BIAS = dataclasses.replace(
    CIFAR10_CPU, name="cifar10-cpu-bias", sparsities=(0.0, 0.5), seeds=(0, 1, 2, 3, 4),
    scores=tuple(rule for rule in BIAS_RULES if rule != "forgetting"))
# Which examples to keep depends on how many there are (the regime chapter): keep-hard, keep-easy, random and
# the matched twin at half sparsity, on 100, 300 and 1,000 images per class, 3 seeds, pruned by cifar10-cpu's
# full-set scores (shared, not recomputed); about an hour on 2 cores (`--dry-run`).
CIFAR10_CPU_REGIME = dataclasses.replace(
    CIFAR10_CPU, name="cifar10-cpu-regime", train_per_class=None, train_sizes=(100, 300, 1000), sparsities=(0.0, 0.5),
    scores=REGIME_RULES)
# The same on digits, in seconds: the embedded default of the regime chapter; six sizes from 10 images per class
# to 84 (all of the smallest class), so that a crossing is bracketed by sizes at most 1.6x apart.
DIGITS_REGIME = dataclasses.replace(
    DIGITS, name="digits-regime", train_sizes=(10, 16, 25, 40, 60, 84), sparsities=(0.0, 0.5), scores=REGIME_RULES,
    scoring=dataclasses.replace(DIGITS.scoring, full_train=True))

PRESETS: dict[str, Preset] = {p.name: p for p in [
    DIGITS,
    DIGITS_BIAS,
    DIGITS_REGIME,
    Preset(name="cifar10-resnet18", dataset="cifar10", model="resnet18", recipe=PAPER_RECIPE, scoring=PAPER_SCORING,
           seeds=(0, 1, 2)),
    Preset(name="cifar100-resnet50", dataset="cifar100", model="resnet50", model_options=RESNET50_OPTIONS,
           recipe=PAPER_RECIPE, scoring=PAPER_SCORING, seeds=(0, 1, 2)),
    CIFAR10_CPU,
    CIFAR10_CPU_BIAS,
    CIFAR10_CPU_REGIME,
    fast_paper_preset("cifar10-resnet18-fast", "cifar10", "resnet18", epochs=40),
    fast_paper_preset("cifar100-resnet50-fast", "cifar100", "resnet50", epochs=50, model_options=RESNET50_OPTIONS),
]}


PRESET_FILE_SUFFIXES = (".toml", ".json")


PRESET_TYPES = typing.get_type_hints(Preset)


def get(name: str) -> Preset:
    """A built-in preset by name, or one from a ``.toml``/``.json`` file; else a one-line error."""
    if name.endswith(PRESET_FILE_SUFFIXES):
        return load_file(Path(name))
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)} or a .toml/.json preset file")
    return PRESETS[name]


def _read_toml(text: str) -> dict:
    """TOML with the standard library (Python >= 3.11) or tomli, imported only when a TOML preset is read."""
    try:
        import tomllib
    except ImportError:
        try:
            import tomli as tomllib
        except ImportError:
            raise UserError("a .toml preset needs Python >= 3.11 or `pip install tomli`; a .json preset needs "
                            "neither") from None
    return tomllib.loads(text)


def load_file(path: Path) -> Preset:
    """A preset from a TOML or JSON file: its keys are Preset fields (tables for recipe/scoring);
    ``base = "<preset>"`` starts from a built-in preset, otherwise ``dataset`` and ``model`` are required."""
    try:
        text = path.read_text()
        mapping = _read_toml(text) if path.suffix == ".toml" else json.loads(text)
    except (FileNotFoundError, IsADirectoryError):
        raise UserError(f"preset file {path} does not exist") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: not valid {path.suffix[1:].upper()} ({error})") from None
    if not isinstance(mapping, dict):
        raise UserError(f"{path}: expected a table of preset keys")
    mapping = dict(mapping)
    base = mapping.pop("base", None)
    if base is not None:
        preset = get(str(base))
    elif {"dataset", "model"} <= mapping.keys():
        preset = Preset(name=path.stem, dataset="", model="")
    else:
        raise UserError(f"{path}: needs 'dataset' and 'model', or 'base' naming a built-in preset")
    preset = dataclasses.replace(preset, name=path.stem)
    return apply_mapping(preset, mapping, where=str(path)).validate()


def from_dict(mapping: dict) -> Preset:
    """The preset a :meth:`Preset.to_dict` mapping describes (e.g. a run record's ``full_preset``), validated."""
    def without_none(table: dict) -> dict:
        return {key: without_none(value) if isinstance(value, dict) else value
                for key, value in table.items() if value is not None}

    fields = without_none({key: value for key, value in mapping.items() if key != "name"})
    return apply_mapping(Preset(name=mapping["name"], dataset="", model=""), fields, where="preset mapping").validate()


def apply_mapping(preset: Preset, mapping: dict, *, where: str) -> Preset:
    """Set typed values (nested tables for the recipe, scoring and scoring.recipe); name any unknown key or wrong type."""
    return _replace_fields(preset, mapping, where=where, prefix="", root=preset)


def _dataclass_in(hint) -> type | None:
    """The dataclass type of a field hint (``Recipe`` or ``Recipe | None``), else None."""
    for candidate in (hint, *typing.get_args(hint)):
        if isinstance(candidate, type) and dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _nested_default(kind: type, root: Preset):
    """What an unset nested dataclass starts from: a scoring recipe starts from the preset's recipe."""
    return root.recipe if kind is Recipe else kind()


def _replace_fields(obj, mapping: dict, *, where: str, prefix: str, root: Preset):
    hints = typing.get_type_hints(type(obj))
    changes = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if key not in hints:
            owner = f"{prefix[:-1]} has" if prefix else "known:"
            raise UserError(f"{where}: unknown preset key {name!r}; {owner} {sorted(hints)}")
        kind = _dataclass_in(hints[key])
        if kind is not None:
            if not isinstance(value, dict):
                raise UserError(f"{where}: {name} must be a table of {kind.__name__} fields")
            current = getattr(obj, key) or _nested_default(kind, root)
            value = _replace_fields(current, value, where=where, prefix=f"{name}.", root=root)
        else:
            value = _typed(value, hints[key], name, where)
        changes[key] = value
    return dataclasses.replace(obj, **changes)


def _typed(value, hint, key: str, where: str):
    """``value`` checked against the type hint ``hint`` (ints accepted for floats, lists for tuples)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(_typed(v, args[0], key, where) for v in value)
    if origin is dict and isinstance(value, dict):
        return {k: _typed(v, args[1], f"{key}.{k}", where) for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    expected = getattr(origin or hint, "__name__", str(hint))
    raise UserError(f"{where}: {key} must be {expected}, got {type(value).__name__} {value!r}")


def _guess(text: str):
    """A value for a new dictionary key (e.g. a model option): bool, int or float if it reads as one, else text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


EMPTY_TUPLE_KINDS = {"train_sizes": int, "trajectory": int}  # what an empty tuple field holds, for --set


def _parse(text: str, like, key: str):
    """Parse ``text`` into the type of the current value ``like``."""
    try:
        if isinstance(like, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if isinstance(like, tuple):
            kind = type(like[0]) if like else EMPTY_TUPLE_KINDS.get(key.rpartition(".")[2], float)
            return tuple(_parse(t.strip(), kind(), key) for t in text.split(",") if t.strip())
        if like is None:  # optional int (train_per_class)
            return None if text.lower() in ("none", "") else int(text)
        if isinstance(like, int) and text.lower() == "none":
            return None
        return type(like)(text)
    except ValueError:
        raise UserError(f"--set {key}={text}: expected {type(like).__name__}") from None


def with_rule(preset: Preset, rule: str) -> Preset:
    """The preset with ``rule`` among its scores (what ``prune`` / ``train --score RULE`` run), so that its scoring
    runs take what the rule needs (forgetting events); a rule already there leaves the preset as it is."""
    return preset if rule in preset.scores else dataclasses.replace(preset, scores=(*preset.scores, rule)).validate()


def with_overrides(preset: Preset, assignments: list[str]) -> Preset:
    """Apply ``key=value`` edits (dotted for nested fields, e.g. ``recipe.epochs=5``, ``scoring.recipe.lr=0.2``,
    ``scoring.epochs.grand=0``, ``model_options.width=8``) and validate."""
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep:
            raise UserError(f"--set expects key=value, got {assignment!r}")
        parts = key.strip().split(".")
        if parts[0] == "name":
            raise UserError(f"unknown preset key {key!r}")
        preset = _set_path(preset, parts, text.strip(), key.strip(), root=preset)
    return preset.validate()


def _set_path(obj, parts: list[str], text: str, key: str, *, root: Preset):
    """``obj`` with the field at ``parts`` set from ``text`` (typed like its current value)."""
    head, rest = parts[0], parts[1:]
    if isinstance(obj, dict):
        if rest:
            raise UserError(f"unknown preset key {key!r}")
        return {**obj, head: _parse(text, obj[head], key) if head in obj else _guess(text)}
    hints = typing.get_type_hints(type(obj))
    if head not in hints:
        where = "" if obj is root else f"; {'.'.join(key.split('.')[:-len(parts)])} has {sorted(hints)}"
        raise UserError(f"unknown preset key {key!r}{where}")
    current = getattr(obj, head)
    kind = _dataclass_in(hints[head])
    if rest:
        if current is None and kind is not None:
            current = _nested_default(kind, root)
        if not (dataclasses.is_dataclass(current) or isinstance(current, dict)):
            raise UserError(f"unknown preset key {key!r}")
        value = _set_path(current, rest, text, key, root=root)
    elif kind is not None or isinstance(current, dict):
        raise UserError(f"unknown preset key {key!r}: name one of its fields, e.g. {key}.<field>=value")
    else:
        value = _parse(text, current, key)
    return dataclasses.replace(obj, **{head: value})
