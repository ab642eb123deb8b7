"""The grid of a preset (score x sparsity x seed), what of it is missing, and running it in order."""

from __future__ import annotations

from dataclasses import dataclass

from tqdm.auto import tqdm

from .experiment import DENSE, compute_scores, load_dataset, run_config, train_run
from .presets import Preset
from .store import Store, config_key


@dataclass(frozen=True)
class RunSpec:
    score: str
    sparsity: float
    seed: int


def plan(preset: Preset) -> list[RunSpec]:
    """Every run of the preset; sparsity 0 is one dense run per seed, shared by all scores."""
    runs = []
    for sparsity in preset.sparsities:
        for score in ([DENSE] if sparsity == 0 else preset.scores):
            runs.extend(RunSpec(score, sparsity, seed) for seed in preset.seeds)
    return runs


def run_sweep(preset: Preset, store: Store, *, progress: bool = True) -> list[dict]:
    """Run the whole grid in order, skipping runs whose record is already stored; returns all records."""
    dataset = load_dataset(preset)
    if any(s in ("el2n", "grand") for s in preset.scores):
        compute_scores(preset, dataset, store, progress=progress)
    specs = plan(preset)
    records = []
    bar = tqdm(specs, desc=f"sweep {preset.name}", unit="run", disable=not progress)
    for spec in bar:
        done = store.has_run(config_key(run_config(preset, dataset, spec.score, spec.sparsity, spec.seed)))
        bar.set_postfix_str(f"{spec.score} s={spec.sparsity:g} seed={spec.seed}" + (" (stored)" if done else ""))
        records.append(train_run(preset, dataset, spec.score, spec.sparsity, spec.seed, store))
    return records
