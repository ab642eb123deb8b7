"""The grid of a preset (score x sparsity x seed), what of it is missing, and running it in order."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .experiment import compute_scores, load_dataset, run_config, scores_config, train_run
from .presets import DENSE, Preset
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


NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
KERNEL = "python3"
TITLES = {"analysis": "Results: {preset}", "scores": "Scores: {preset}"}


def execute_notebook(name: str, output: Path, parameters: dict, *, title: str | None = None) -> None:
    """Run ``notebooks/<name>.ipynb`` with papermill; the executed copy appears at ``output`` only when done.

    In the copy, the parameter cells are tagged for removal from the book and ``title`` (if given)
    replaces the first heading, so that each preset's chapter is named after it.
    """
    import nbformat
    import papermill

    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.parent / f".{output.stem}.partial.ipynb"
    notebook = papermill.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(partial), parameters=parameters,
                                          kernel_name=KERNEL, progress_bar=False, cwd=os.getcwd())
    for cell in notebook.cells:
        tags = cell.metadata.setdefault("tags", [])
        if {"parameters", "injected-parameters"} & set(tags):
            tags.append("remove-cell")
    if title:
        first = next(c for c in notebook.cells if c.cell_type == "markdown")
        first.source = "\n".join([f"# {title}", *first.source.splitlines()[1:]])
    nbformat.write(notebook, str(partial))
    os.replace(partial, output)


def run_sweep_notebooks(preset: Preset, overrides: list[str], store: Store, book_runs: Path,
                        *, progress: bool = True) -> list[dict]:
    """The sweep as executed notebooks under ``book_runs/<preset>/``: scores, one per run, then analysis.

    A run whose record and executed notebook both exist is skipped, so a rerun does only what is missing.
    """
    dataset = load_dataset(preset)
    folder = Path(book_runs) / preset.name
    common = {"preset": preset.name, "store": str(Path(store.root).resolve()), "overrides": list(overrides)}
    steps: list[tuple[str, Path, dict, bool]] = []
    if any(s in ("el2n", "grand") for s in preset.scores):
        path = folder / "scores.ipynb"
        done = path.is_file() and store.load_scores(config_key(scores_config(preset, dataset))) is not None
        steps.append(("scores", path, common, done))
    keys = []
    for spec in plan(preset):
        key = config_key(run_config(preset, dataset, spec.score, spec.sparsity, spec.seed))
        keys.append(key)
        path = folder / "train" / f"{spec.score}-s{spec.sparsity:g}-seed{spec.seed}.ipynb"
        steps.append(("train_sparse", path, {**common, "score": spec.score, "sparsity": spec.sparsity,
                                             "seed": spec.seed}, path.is_file() and store.has_run(key)))
    steps.append(("analysis", folder / "analysis.ipynb", {**common, "figures": str((folder / "figures").resolve())},
                  False))  # always re-run: cheap, and it must see every record
    steps.append(("reproducibility", Path(book_runs) / "reproducibility.ipynb", {"store": common["store"]}, False))
    bar = tqdm(steps, desc=f"sweep {preset.name}", unit="notebook", disable=not progress)
    for name, path, parameters, done in bar:
        bar.set_postfix_str(f"{path.relative_to(book_runs)}" + (" (done)" if done else ""))
        if not done:
            execute_notebook(name, path, parameters, title=TITLES.get(name, "").format(preset=preset.name) or None)
    return [store.load_run(key) for key in keys]
