"""The steps of a study for one preset: score the training set, prune, train on the kept subset, record.

Each step reads from and writes to a :class:`~datadiet_nb.store.Store`, keyed by everything that
determines its output, so asking again for a finished step returns the stored result.
"""

from __future__ import annotations

import dataclasses
import time
from datetime import datetime, timezone

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import CODE_VERSION, data, models
from .data import Dataset
from .errors import UserError
from .metrics import bias_measures, class_accuracy, overall_accuracy
from .presets import DENSE, Preset
from .provenance import provenance, resolve_device
from .prune import check_sparsity, class_keep_ratio, random_indices, select_indices
from .scores import SCORE_FUNCTIONS
from .store import Store, config_key
from .train import predict, train



def load_dataset(preset: Preset) -> Dataset:
    """The preset's dataset, restricted to its class-balanced training subset if it has one."""
    return data.load(preset.dataset).with_train_per_class(preset.train_per_class)


def seeded_model(preset: Preset, dataset: Dataset, seed: int) -> nn.Module:
    """The preset's model for this dataset, its initial weights drawn from ``seed``."""
    torch.manual_seed(seed)
    return models.build(preset.model, num_classes=dataset.num_classes, in_channels=dataset.image_shape[0],
                        **preset.model_options)


def _model_config(preset: Preset, dataset: Dataset) -> dict:
    return {"dataset": dataset.describe(), "model": preset.model, "model_options": preset.model_options,
            "recipe": dataclasses.asdict(preset.recipe), "code_version": CODE_VERSION}


def scores_config(preset: Preset, dataset: Dataset) -> dict:
    """Everything that determines a preset's scores (and so their store key)."""
    return {**_model_config(preset, dataset), "scoring": dataclasses.asdict(preset.scoring),
            "scoring_seeds": preset.scoring.seeds}


def compute_scores(preset: Preset, dataset: Dataset, store: Store, *, progress: bool = False) -> dict[str, np.ndarray]:
    """EL2N and GraNd of every training example, mean over the K scoring runs (and each run's), cached.

    Run k trains a fresh model with seed ``seed_offset + k`` for ``epoch`` epochs of the full
    recipe, then scores the un-augmented training set in native order in eval mode.
    """
    config = scores_config(preset, dataset)
    key = config_key(config)
    cached = store.load_scores(key)
    if cached is not None:
        return cached
    device = resolve_device(preset.device)
    started = time.perf_counter()
    inputs = data.normalize(dataset.train_images, torch.tensor(dataset.mean), torch.tensor(dataset.std))
    per_run = {name: [] for name in SCORE_FUNCTIONS}
    for seed in tqdm(preset.scoring.seeds, desc="scoring runs", disable=not progress):
        model = seeded_model(preset, dataset, seed)
        if preset.scoring.epoch > 0:
            train(model, dataset, preset.recipe, seed=seed, device=device, stop_epoch=preset.scoring.epoch,
                  progress=progress)
        model.to(device)
        for name, score in SCORE_FUNCTIONS.items():
            per_run[name].append(score(model, inputs, dataset.train_labels, batch_size=preset.scoring.batch_size)
                                 .double().numpy())
    arrays = {}
    for name, runs in per_run.items():
        arrays[f"{name}_runs"] = np.stack(runs)
        arrays[name] = arrays[f"{name}_runs"].mean(0)
    store.save_scores(key, {**config, "key": key, "seconds": time.perf_counter() - started,
                            "provenance": provenance(device)}, arrays)
    return arrays


def kept_indices(preset: Preset, dataset: Dataset, score: str, sparsity: float, seed: int, store: Store,
                 *, progress: bool = False) -> np.ndarray:
    """Training indices kept at ``sparsity`` by ``score`` (``random`` draws with ``seed``)."""
    check_sparsity(sparsity, preset.offset)
    if sparsity == 0:
        return np.arange(dataset.num_train, dtype=np.int64)
    if score == "random":
        return random_indices(dataset.num_train, sparsity, seed=seed)
    if score not in SCORE_FUNCTIONS:
        raise UserError(f"unknown score {score!r}; choose from {['random', *SCORE_FUNCTIONS]}")
    scores = compute_scores(preset, dataset, store, progress=progress)[score]
    return select_indices(scores, sparsity, offset=preset.offset)


def run_config(preset: Preset, dataset: Dataset, score: str, sparsity: float, seed: int) -> dict:
    """Everything that determines one training run (and so its store key)."""
    score = DENSE if sparsity == 0 else score
    config = {**_model_config(preset, dataset), "score": score, "sparsity": sparsity,
              "offset": preset.offset if sparsity else 0.0, "seed": seed}
    if score in SCORE_FUNCTIONS:
        config["scores_key"] = config_key(scores_config(preset, dataset))
    return config


def train_run(preset: Preset, dataset: Dataset, score: str, sparsity: float, seed: int, store: Store,
              *, progress: bool = False) -> dict:
    """Prune, train with ``seed``, evaluate on the test set at the final epoch, and store the record."""
    config = run_config(preset, dataset, score, sparsity, seed)
    key = config_key(config)
    if store.has_run(key):
        return store.load_run(key)
    device = resolve_device(preset.device)
    started = time.perf_counter()
    kept = kept_indices(preset, dataset, score, sparsity, seed, store, progress=progress)
    model = seeded_model(preset, dataset, seed)
    fit = train(model, dataset, preset.recipe, seed=seed, indices=torch.from_numpy(kept), device=device,
                progress=progress)
    predictions = predict(model, dataset.test_images, dataset, batch_size=preset.recipe.eval_batch_size,
                          device=device).numpy()
    labels = dataset.test_labels.numpy()
    class_acc = class_accuracy(predictions, labels, dataset.num_classes)
    record = {
        **config, "key": key, "preset": preset.name, "classes": list(dataset.classes),
        "num_kept": int(len(kept)), "kept_file": store.kept_path(key).name,
        "overall_accuracy": overall_accuracy(predictions, labels),
        "class_accuracy": class_acc.tolist(),
        "keep_ratio": class_keep_ratio(dataset.train_labels.numpy(), kept, dataset.num_classes).tolist(),
        "bias": bias_measures(class_acc), "predictions": predictions.tolist(),
        "train": dataclasses.asdict(fit), "seconds": time.perf_counter() - started,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "provenance": provenance(device),
        "full_preset": preset.to_dict(),
    }
    store.save_run(key, record, kept)
    return store.load_run(key)  # the stored form (JSON types), identical to what a later call returns
