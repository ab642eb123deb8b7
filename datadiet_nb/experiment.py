"""The steps of a study for one preset: score the training set, prune, train on the kept subset, record.

Each step reads from and writes to a :class:`~datadiet_nb.store.Store`, keyed by everything that
determines its output, so asking again for a finished step returns the stored result.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import torch
from torch import nn

from . import CODE_VERSION, data, models, progress as progress_bars
from .data import Dataset
from .errors import UserError
from .metrics import bias_measures, class_accuracy, overall_accuracy
from .presets import DENSE, PRUNING_SCORES, Preset
from .provenance import provenance, resolve_device
from .prune import (RULES, SELECTION_VERSION, ccs_indices, check_sparsity, class_balanced_indices, class_keep_ratio,
                    drop_indices, matched_random_indices, random_indices, select_indices)
from .scores import EPOCH_FUNCTIONS, SCORE_FUNCTIONS, forgetting_scores
from .store import WAIT_POLL_S, Store, config_key, read_arrays, read_json, write_arrays, write_json
from .train import Diverged, Shard, predict, train

T = TypeVar("T")
log = logging.getLogger("datadiet_nb")


def load_dataset(preset: Preset) -> Dataset:
    """The preset's dataset, restricted to its class-balanced training subset if it has one."""
    return data.load(preset.dataset).with_train_per_class(preset.train_per_class)


def scored_dataset(preset: Preset, dataset: Dataset) -> Dataset:
    """The dataset whose training set is scored: the full one with ``scoring.full_train``, else ``dataset``."""
    return dataset.full if preset.scoring.full_train and dataset.full is not None else dataset


def scoring_recipe(preset: Preset):
    """The recipe the scoring runs train with: the scoring's own, else the preset's."""
    return preset.scoring.recipe or preset.recipe


def seeded_model(preset: Preset, dataset: Dataset, seed: int) -> nn.Module:
    """The preset's model for this dataset, its initial weights drawn from ``seed``."""
    torch.manual_seed(seed)
    return models.build(preset.model, num_classes=dataset.num_classes, in_channels=dataset.image_shape[0],
                        **preset.model_options)


def _model_config(preset: Preset, dataset: Dataset, recipe=None) -> dict:
    return {"dataset": dataset.describe(), "model": preset.model, "model_options": preset.model_options,
            "recipe": dataclasses.asdict(recipe or preset.recipe), "code_version": CODE_VERSION}


def scores_config(preset: Preset, dataset: Dataset) -> dict:
    """Everything that determines a preset's scores (and so their store key)."""
    scoring = dataclasses.asdict(preset.scoring)
    if not scoring["per_seed"]:
        del scoring["per_seed"]  # the keys of shared scores stay what they were before per-seed scoring existed
    config = {**_model_config(preset, scored_dataset(preset, dataset), scoring_recipe(preset)),
              "scoring": scoring, "scoring_seeds": preset.scoring_seeds()}
    if counts_forgetting(preset):
        config["forgetting_epochs"] = preset.scoring.epoch_of("forgetting")
    return config


def counts_forgetting(preset: Preset) -> bool:
    """Whether the scoring runs also count forgetting events (only when a rule of the preset needs them: an
    un-augmented pass over the training set after every epoch)."""
    return any(RULES.get(rule) == "forgetting" for rule in preset.scores)


VALIDATION_FRACTION = 0.1  # of each class's training examples, held out to rank classes without the test set


def validation_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices, ascending: ``fraction`` of each class drawn at random with ``seed``."""
    rng = np.random.default_rng(seed)
    held = [rng.choice(np.flatnonzero(labels == c), size=max(1, round(fraction * np.sum(labels == c))), replace=False)
            for c in np.unique(labels)]
    validation = np.sort(np.concatenate(held)).astype(np.int64)
    return np.setdiff1d(np.arange(len(labels)), validation).astype(np.int64), validation


def validation_config(preset: Preset, dataset: Dataset) -> dict:
    """Everything that determines the validation class ranking (and so its store key)."""
    return {**_model_config(preset, dataset), "validation_fraction": VALIDATION_FRACTION,
            "seed": preset.seeds[0]}


def validation_class_sizes(preset: Preset, dataset: Dataset) -> np.ndarray:
    """How many validation images of each class :func:`validation_class_accuracy` measures on."""
    labels = dataset.train_labels.numpy()
    _, validation = validation_split(labels, VALIDATION_FRACTION, validation_config(preset, dataset)["seed"])
    return np.bincount(labels[validation], minlength=dataset.num_classes)


def validation_class_accuracy(preset: Preset, dataset: Dataset, store: Store, *, progress: bool = False) -> np.ndarray:
    """Each class's accuracy on a validation split of the training set, of a dense model trained on the rest.

    This ranks classes (e.g. the best and worst of Fig 4) without touching the test set, so the classes
    chosen are not the ones whose test accuracy happened to come out low (regression to the mean). Cached.
    """
    config = validation_config(preset, dataset)
    key = config_key(config)
    path = store.root / "validation" / f"{key}.json"

    def load() -> np.ndarray | None:
        try:
            return np.asarray(read_json(path)["class_accuracy"], dtype=np.float64)
        except (OSError, ValueError, KeyError):
            return None

    def make() -> np.ndarray:
        device = resolve_device(preset.device)
        train_idx, val_idx = validation_split(dataset.train_labels.numpy(), VALIDATION_FRACTION, config["seed"])
        model = seeded_model(preset, dataset, config["seed"])
        train(model, dataset, preset.recipe, seed=config["seed"], indices=torch.from_numpy(train_idx),
              device=device, progress=progress)
        predictions = predict(model, dataset.train_images[val_idx], dataset, device=device,
                              batch_size=preset.recipe.eval_batch_size).numpy()
        accuracy = class_accuracy(predictions, dataset.train_labels.numpy()[val_idx], dataset.num_classes)
        write_json(path, {**config, "key": key, "class_accuracy": accuracy.tolist(),
                          "num_validation": int(len(val_idx)), "provenance": provenance(device)})
        return accuracy

    return _produce(store, key, "validation ranking", load, make)


class RunFailed(RuntimeError):
    """A run or scoring job of the study failed (e.g. diverged); the reason is recorded in the store."""


def _produce(store: Store, key: str, what: str, load: Callable[[], T | None], make: Callable[[], T]) -> T:
    """The stored result of a job, computed here under a claim if nobody has, or awaited if someone is.

    A failure recorded for the job (by this or another process) raises :class:`RunFailed`; a
    divergence while computing it is recorded as such a failure.
    """
    announced = False
    while True:
        found = load()
        if found is not None:
            return found
        failure = store.load_failure(key)
        if failure is not None:
            raise RunFailed(f"{what} failed: {failure['message']} (see {store.failure_path(key)})")
        claim = store.try_claim(key)
        if claim is None:  # another process is computing it: wait for its result
            holder = store.claim_holder(key) or {}
            if not announced:
                log.warning("%s is being computed by %s pid %s; waiting for it", what, holder.get("host", "?"),
                            holder.get("pid", "?"))
                announced = True
            time.sleep(WAIT_POLL_S)
            continue
        with claim:
            found = load()  # finished by another process between our look and our claim
            if found is not None:
                return found
            store.remove_partial_writes(key)  # of a process killed while writing this job's files
            store.log_event("start", key, what)
            try:
                result = make()
            except (Diverged, RunFailed) as error:  # it diverged, or a job it needs (its scores) failed
                store.save_failure(key, {"what": what, "message": str(error)})
                store.log_event("failed", key, what)
                raise RunFailed(f"{what} failed: {error}") from None
            store.log_event("done", key, what)
            return result


def compute_scores(preset: Preset, dataset: Dataset, store: Store, *, progress: bool = False) -> dict[str, np.ndarray]:
    """EL2N and GraNd of every example of the scored training set (:func:`scored_dataset`), cached.

    Each scoring run (seeds: :meth:`~datadiet_nb.presets.Preset.scoring_seeds`) trains a fresh model on the
    scoring recipe and takes each score at its epoch (``scoring.epoch_of``) from the un-augmented training set in
    native order, in eval mode.
    Arrays: ``el2n`` and ``grand`` (means over the runs), ``<name>_runs`` (each run's, [runs, N]),
    ``el2n_at<e>_runs`` for the trajectory epochs, and with ``scoring.per_seed`` ``<name>_seed<t>``, the mean of
    training seed t's own K runs (:func:`pruning_scores`). Every score taken is kept at once (and every run
    checkpointed while it trains), so an interrupted job resumes where it stopped.
    """
    config = scores_config(preset, dataset)
    key = config_key(config)
    scored = scored_dataset(preset, dataset)
    return _produce(store, key, "scores", lambda: store.load_scores(key, scored.num_train),
                    lambda: _score(preset, scored, store, config, key, progress))


def scores_wanted(preset: Preset) -> dict[int, list[str]]:
    """Epoch -> names of the arrays taken at that epoch in each scoring run (scores and trajectory)."""
    wanted: dict[int, list[str]] = {}
    for name in SCORE_FUNCTIONS:
        wanted.setdefault(preset.scoring.epoch_of(name), []).append(name)
    for epoch in preset.scoring.trajectory:
        wanted.setdefault(epoch, []).append(f"el2n_at{epoch}")
    if counts_forgetting(preset):
        for epoch in range(1, preset.scoring.epoch_of("forgetting") + 1):
            wanted.setdefault(epoch, []).append(f"correct_at{epoch}")
    return wanted


def finish_scoring_run(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A scoring run's arrays as kept: the per-epoch predictions (``correct_at<e>``) become its forgetting events."""
    epochs = sorted(int(name.removeprefix("correct_at")) for name in arrays if name.startswith("correct_at"))
    kept = {name: array for name, array in arrays.items() if not name.startswith("correct_at")}
    if epochs:
        kept["forgetting"] = forgetting_scores(np.stack([arrays[f"correct_at{e}"] for e in epochs]))
    return kept


def _score(preset: Preset, dataset: Dataset, store: Store, config: dict, key: str, progress: bool) -> dict:
    """Average the K scoring runs (each computed here, or awaited if another process holds it) and store them."""
    device = resolve_device(preset.device)
    started = time.perf_counter()
    names = score_array_names(preset)
    per_run: dict[str, list[np.ndarray]] = {name: [] for name in names}
    seeds = preset.scoring_seeds()
    for seed in progress_bars.iterate(seeds, enabled=progress, desc="scoring runs"):
        scores = compute_scoring_run(preset, dataset, store, seed, progress=progress)
        for name in names:
            per_run[name].append(scores[name])
    arrays = {}
    for name, runs in per_run.items():
        arrays[f"{name}_runs"] = np.stack(runs)
        if name in SCORE_FUNCTIONS or name == "forgetting":
            arrays[name] = arrays[f"{name}_runs"].mean(0)
            if preset.scoring.per_seed:
                for training_seed in preset.seeds:
                    rows = [seeds.index(seed) for seed in preset.scoring_seeds_of(training_seed)]
                    arrays[seed_scores_name(name, training_seed)] = arrays[f"{name}_runs"][rows].mean(0)
    store.save_scores(key, {**config, "key": key, "seconds": time.perf_counter() - started,
                            "provenance": provenance(device)}, arrays)
    for seed in seeds:
        scoring_run_file(store, key, seed).unlink(missing_ok=True)
    return store.load_scores(key, dataset.num_train)


def seed_scores_name(score: str, training_seed: int) -> str:
    """The stored array of a score's mean over the scoring runs of one training seed (``scoring.per_seed``)."""
    return f"{score}_seed{training_seed}"


def pruning_scores(preset: Preset, scores: dict[str, np.ndarray], score: str, training_seed: int) -> np.ndarray:
    """The scores that prune the runs of ``training_seed``: the mean of all scoring runs, or with
    ``scoring.per_seed`` the mean of that seed's own (one of the preset's seeds)."""
    if not preset.scoring.per_seed:
        return scores[score]
    if training_seed not in preset.seeds:
        raise UserError(f"seed {training_seed} is not one of {preset.name}'s seeds {list(preset.seeds)}: with "
                        "scoring.per_seed each seed is pruned by scoring runs of its own; add it (--set seeds=...) "
                        "or share the scores (--set scoring.per_seed=false)")
    return scores[seed_scores_name(score, training_seed)]


def score_array_names(preset: Preset) -> list[str]:
    """The arrays each scoring run keeps, in the order they are taken (scores, trajectory, forgetting)."""
    wanted = scores_wanted(preset)
    names = [name for epoch in sorted(wanted) for name in wanted[epoch] if not name.startswith("correct_at")]
    return names + (["forgetting"] if counts_forgetting(preset) else [])


def scoring_run_key(scores_key: str, seed: int) -> str:
    """The store key of one scoring run of the scores ``scores_key`` (its claim, failure and files)."""
    return f"{scores_key}-seed{seed}"


def scoring_run_file(store: Store, scores_key: str, seed: int) -> Path:
    """Where a finished scoring run's arrays wait until the K runs are averaged (then it is deleted)."""
    return store.checkpoint_path(f"{scoring_run_key(scores_key, seed)}.scores.npz")


def compute_scoring_run(preset: Preset, dataset: Dataset, store: Store, seed: int,
                        *, progress: bool = False) -> dict[str, np.ndarray]:
    """The arrays of the scoring run with ``seed`` (one of ``preset.scoring_seeds()``), computed once under a claim.

    Each run is a job of its own, so the K runs can train on K workers; once the scores are averaged,
    a run's arrays are read back from them.
    """
    config = scores_config(preset, dataset)
    key = config_key(config)
    scored = scored_dataset(preset, dataset)
    names = score_array_names(preset)
    finished = scoring_run_file(store, key, seed)

    def load() -> dict[str, np.ndarray] | None:
        found = _read_scores_file(finished, names, scored.num_train)
        if found is not None:
            return found
        averaged = store.load_scores(key, scored.num_train)
        if averaged is None:
            return None
        row = preset.scoring_seeds().index(seed)
        return {name: averaged[f"{name}_runs"][row] for name in names}

    def make() -> dict[str, np.ndarray]:
        run_key = scoring_run_key(key, seed)
        arrays = _scoring_run(preset, scored, store, run_key, seed, scores_wanted(preset),
                              resolve_device(preset.device), progress)
        scores = keep_scoring_run(preset, store, key, seed, arrays)
        run_checkpoint(store, run_key).unlink(missing_ok=True)
        return scores

    if seed not in preset.scoring_seeds():
        raise UserError(f"seed {seed} is not a scoring seed of {preset.name}: {preset.scoring_seeds()}")
    return _produce(store, scoring_run_key(key, seed), f"scoring run {seed}", load, make)


def _epoch_file(store: Store, run_key: str, epoch: int) -> Path:
    return store.checkpoint_path(f"{run_key}-epoch{epoch}.scores.npz")


def run_checkpoint(store: Store, key: str, shard: Shard | None = None) -> Path:
    """The training checkpoint of the job ``key`` (a rank of a distributed run has its own)."""
    return store.checkpoint_path(f"{key}.pt" if shard is None else f"{key}.rank{shard.rank}.pt")


def keep_scoring_run(preset: Preset, store: Store, scores_key: str, seed: int,
                     arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Store a finished scoring run's arrays (:func:`finish_scoring_run`) until the runs are averaged, and delete
    the per-epoch files it was taken from."""
    scores = finish_scoring_run(arrays)
    write_arrays(scoring_run_file(store, scores_key, seed), **scores)
    for epoch in scores_wanted(preset):
        _epoch_file(store, scoring_run_key(scores_key, seed), epoch).unlink(missing_ok=True)
    return scores


def _scores_of(score: Callable[..., torch.Tensor], model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
               *, batch_size: int) -> np.ndarray:
    return score(model, inputs, labels, batch_size=batch_size).double().numpy()


def _scoring_run(preset: Preset, dataset: Dataset, store: Store, run_key: str, seed: int,
                 wanted: dict[int, list[str]], device: torch.device, progress: bool, *, shard: Shard | None = None,
                 measure: Callable[..., np.ndarray] = _scores_of, sync_batchnorm: bool = False
                 ) -> dict[str, np.ndarray]:
    """One scoring run: train on the scoring recipe, taking (and saving) each wanted score at its epoch.

    With ``shard`` this process is one rank of a distributed scoring run (:mod:`.distributed`): ``measure``
    scores this rank's part and gathers every rank's; rank 0 writes the arrays and returns them, the others {}.
    """
    model = seeded_model(preset, dataset, seed)
    if sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    # the un-augmented training set, normalised once on the device that scores it (no copy per batch)
    inputs = data.normalize(dataset.train_images.to(device), torch.tensor(dataset.mean, device=device),
                            torch.tensor(dataset.std, device=device))
    labels = dataset.train_labels.to(device)
    writes = shard is None or shard.rank == 0

    def take(epoch: int) -> None:
        path = _epoch_file(store, run_key, epoch)
        if epoch in wanted and _read_scores_file(path, wanted[epoch], dataset.num_train) is None:
            arrays = {name: measure(EPOCH_FUNCTIONS[name.partition("_at")[0]], model, inputs, labels,
                                    batch_size=preset.scoring.batch_size) for name in wanted[epoch]}
            if writes:
                write_arrays(path, **arrays)

    take(0)
    last = max(wanted)
    if last > 0:
        train(model, dataset, scoring_recipe(preset), seed=seed, device=device, stop_epoch=last,
              progress=progress and writes, checkpoint=run_checkpoint(store, run_key, shard),
              checkpoint_every=preset.checkpoint_epochs, on_epoch=take, shard=shard)
    if not writes:
        return {}
    scores: dict[str, np.ndarray] = {}
    for epoch, names in wanted.items():
        found = _read_scores_file(_epoch_file(store, run_key, epoch), names, dataset.num_train)
        if found is None:
            raise RuntimeError(f"scoring run {seed} ended before epoch {epoch}: the scoring recipe trains "
                               f"fewer epochs than the scores need")
        scores.update(found)
    return scores


def _read_scores_file(path: Path, names: list[str], num_train: int) -> dict[str, np.ndarray] | None:
    """Scores kept from an interrupted job, if complete (written atomically, so intact when present)."""
    try:
        scores = read_arrays(path)
    except (OSError, ValueError):
        return None
    ok = all(name in scores and scores[name].shape == (num_train,) for name in names)
    return {name: scores[name] for name in names} if ok else None


def kept_indices(preset: Preset, dataset: Dataset, score: str, sparsity: float, seed: int, store: Store,
                 *, progress: bool = False) -> np.ndarray:
    """Training indices kept at ``sparsity`` by the rule ``score`` (one of :data:`~datadiet_nb.prune.RULES`);
    rules that draw at random draw with ``seed``."""
    check_sparsity(sparsity, preset.offset_at(sparsity))
    if sparsity == 0:
        return np.arange(dataset.num_train, dtype=np.int64)
    if score not in RULES:
        raise UserError(f"unknown score {score!r}; choose from {list(RULES)}")
    if RULES[score] == "forgetting" and not counts_forgetting(preset):
        raise UserError(f"the rule {score!r} needs forgetting events: add it to the preset's scores "
                        f"(--set scores={','.join((*preset.scores, score))})")
    labels, num_classes = dataset.train_labels.numpy(), dataset.num_classes
    scores = None
    if RULES[score] is not None:
        scores = pruning_scores(preset, compute_scores(preset, dataset, store, progress=progress), RULES[score], seed)
        if len(scores) != dataset.num_train:  # scored on the full training set; this one is a subset of it
            scores = scores[dataset.source_indices.numpy()]
    if score == "random":
        return random_indices(dataset.num_train, sparsity, seed=seed)
    if score in SCORE_FUNCTIONS or score == "forgetting":
        return select_indices(scores, sparsity, offset=preset.offset)
    if score.endswith("-easy"):
        return select_indices(scores, sparsity, easiest=True)
    if score.endswith("-balanced"):
        return class_balanced_indices(scores, labels, sparsity, num_classes, seed=seed)
    if score.endswith("-matched"):
        reference = select_indices(scores, sparsity, offset=preset.offset)
        return matched_random_indices(labels, reference, num_classes, seed=seed)
    if score == "ccs":
        return ccs_indices(scores, sparsity, beta=preset.ccs_beta, bins=preset.ccs_bins, seed=seed)
    error = 1.0 - validation_class_accuracy(preset, dataset, store, progress=progress)  # drop, drop-el2n
    return drop_indices(error, labels, sparsity, num_classes, scores=scores, seed=seed)


def run_config(preset: Preset, dataset: Dataset, score: str, sparsity: float, seed: int) -> dict:
    """Everything that determines one training run (and so its store key)."""
    score = DENSE if sparsity == 0 else score
    config = {**_model_config(preset, dataset), "score": score, "sparsity": sparsity,
              "offset": preset.offset_at(sparsity), "seed": seed}
    if sparsity > 0:
        config["selection_version"] = SELECTION_VERSION
    if RULES.get(score) is not None:
        config["scores_key"] = config_key(scores_config(preset, dataset))
    if score == "ccs":
        config["ccs"] = {"beta": preset.ccs_beta, "bins": preset.ccs_bins}
    if score.startswith("drop"):
        config["validation_key"] = config_key(validation_config(preset, dataset))
    return config


def train_run(preset: Preset, dataset: Dataset, score: str, sparsity: float, seed: int, store: Store,
              *, progress: bool = False) -> dict:
    """Prune, train with ``seed``, evaluate on the test set at the final epoch, and store the record.

    A stored record is returned as is; a run another process is computing is awaited; an
    interrupted run resumes from its checkpoint. Raises :class:`RunFailed` if the run diverged.
    """
    check_sparsity(sparsity, preset.offset_at(sparsity))
    if score not in PRUNING_SCORES + (DENSE,):
        raise UserError(f"unknown score {score!r}; choose from {list(PRUNING_SCORES)}")
    config = run_config(preset, dataset, score, sparsity, seed)
    key = config_key(config)
    what = f"run {config['score']} s={sparsity:g} seed={seed}"
    return _produce(store, key, what, lambda: store.load_run(key),
                    lambda: _train_and_record(preset, dataset, config, key, store, progress))


def _train_and_record(preset: Preset, dataset: Dataset, config: dict, key: str, store: Store, progress: bool) -> dict:
    device = resolve_device(preset.device)
    started = time.perf_counter()
    kept = kept_indices(preset, dataset, config["score"], config["sparsity"], config["seed"], store, progress=progress)
    model = seeded_model(preset, dataset, config["seed"])
    checkpoint = run_checkpoint(store, key)
    fit = train(model, dataset, preset.recipe, seed=config["seed"], indices=torch.from_numpy(kept), device=device,
                progress=progress, checkpoint=checkpoint, checkpoint_every=preset.checkpoint_epochs)
    predictions = predict(model, dataset.test_images, dataset, batch_size=preset.recipe.eval_batch_size,
                          device=device).numpy()
    record = run_record(preset, dataset, config, key, store, kept, fit, predictions, device, started)
    record = store.save_run(key, record, kept)
    checkpoint.unlink(missing_ok=True)
    return record  # the stored form (JSON types), identical to what a later call returns


def run_record(preset: Preset, dataset: Dataset, config: dict, key: str, store: Store, kept: np.ndarray, fit,
               predictions: np.ndarray, device: torch.device, started: float, **extra) -> dict:
    """A finished run's record: its config, test predictions (final epoch), class accuracies and keep ratios,
    how it trained, and where (provenance); ``extra`` adds fields (e.g. how a distributed run was split)."""
    labels = dataset.test_labels.numpy()
    class_acc = class_accuracy(predictions, labels, dataset.num_classes)
    return {
        **config, "key": key, "preset": preset.name, "classes": list(dataset.classes),
        "num_kept": int(len(kept)), "kept_file": store.kept_path(key).name,
        "overall_accuracy": overall_accuracy(predictions, labels),
        "class_accuracy": class_acc.tolist(),
        "keep_ratio": class_keep_ratio(dataset.train_labels.numpy(), kept, dataset.num_classes).tolist(),
        "bias": bias_measures(class_acc), "predictions": predictions.tolist(), "test_labels": labels.tolist(),
        "train": dataclasses.asdict(fit), "seconds": time.perf_counter() - started,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "provenance": provenance(device),
        "full_preset": preset.to_dict(), **extra,
    }
