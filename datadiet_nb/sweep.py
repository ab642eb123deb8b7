"""The grid of a preset (score x sparsity x seed) as jobs, their state in a store, and running what is missing.

Any number of sweeps may share one store: each job is computed under a claim (see :mod:`.claims`),
a sweep skips jobs that another process is computing and comes back for them, so the work is split
and nothing runs twice. A killed sweep, run again, finds its finished jobs stored and resumes the
unfinished ones from their checkpoints.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from .experiment import (RunFailed, compute_scores, load_dataset, run_config, scored_dataset, scores_config,
                         train_run)
from .data import Dataset
from .presets import DENSE, Preset
from .errors import UserError
from .scores import SCORES
from .store import WAIT_POLL_S, Store, atomic_write_bytes, config_key

log = logging.getLogger("datadiet_nb")


@dataclass(frozen=True)
class RunSpec:
    score: str
    sparsity: float
    seed: int

    @property
    def label(self) -> str:
        return f"{self.score}-s{self.sparsity:g}-seed{self.seed}"


@dataclass(frozen=True)
class Job:
    """One unit of work of a sweep: the preset's scores (``spec`` None) or one training run."""

    key: str
    spec: RunSpec | None
    needs_scores: bool

    @property
    def label(self) -> str:
        return self.spec.label if self.spec else "scores"


@dataclass
class SweepOutcome:
    """What a sweep ended with: the records of its runs (in plan order) and the jobs that failed, with why."""

    records: list[dict] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)  # job label -> message


def plan(preset: Preset) -> list[RunSpec]:
    """Every run of the preset; sparsity 0 is one dense run per seed, shared by all scores."""
    runs = []
    for sparsity in preset.sparsities:
        for score in ([DENSE] if sparsity == 0 else preset.scores):
            runs.extend(RunSpec(score, sparsity, seed) for seed in preset.seeds)
    return runs


def jobs(preset: Preset, dataset) -> list[Job]:
    """The scores job (if any score needs it), then every run, each with its store key."""
    scored = [s for s in preset.scores if s in SCORES]
    result = [Job(config_key(scores_config(preset, dataset)), None, False)] if scored else []
    for spec in plan(preset):
        key = config_key(run_config(preset, dataset, spec.score, spec.sparsity, spec.seed))
        result.append(Job(key, spec, spec.score in SCORES))
    return result


def job_state(store: Store, job: Job, num_scored: int) -> tuple[str, str]:
    """(``done`` | ``failed`` | ``running`` | ``missing``, detail) of one job in the store
    (``num_scored``: the examples the scores cover, see :func:`~.experiment.scored_dataset`)."""
    stored = store.load_scores(job.key, num_scored) if job.spec is None else store.load_run(job.key)
    if stored is not None:
        return "done", ""
    failure = store.load_failure(job.key)
    if failure is not None:
        return "failed", failure.get("message", "")
    holder = store.claim_holder(job.key)
    if holder is None:
        return "missing", ""
    owner = f"{holder.get('host', '?')} pid {holder.get('pid', '?')}, refreshed {holder['age']:.0f} s ago"
    if store.claim_is_stale(holder):
        return "missing", f"stale claim of {owner}"  # its owner is gone: the next sweep takes it over
    return "running", owner


def status(preset: Preset, store: Store) -> list[tuple[Job, str, str]]:
    """Every job of the preset with its state and detail."""
    dataset = load_dataset(preset)
    num_scored = scored_dataset(preset, dataset).num_train
    return [(job, *job_state(store, job, num_scored)) for job in jobs(preset, dataset)]


def _schedule(preset: Preset, dataset: Dataset, store: Store, execute: Callable[[Job], bool], *,
              extra_done: Callable[[Job], bool],
              retry_failed: bool, progress: bool) -> SweepOutcome:
    """Run every job that is not done, skipping (and coming back for) those another process holds.

    ``execute`` computes one job (in this process or in a notebook), or returns False when another
    process is already on it; ``extra_done`` says whether
    the executor's own output for a stored job exists too (its executed notebook). A failed job
    is reported and the others go on; a user error (e.g. a full disk) stops the sweep.
    """
    todo = jobs(preset, dataset)
    num_scored = scored_dataset(preset, dataset).num_train
    scores = next((job for job in todo if job.spec is None), None)
    if retry_failed:
        for job in todo:
            store.clear_failure(job.key)
    failures: dict[str, str] = {}
    bar = tqdm(total=len(todo), desc=f"sweep {preset.name}", unit="job", disable=not progress)
    while todo:
        waiting = []
        for job in todo:
            state, detail = job_state(store, job, num_scored)
            needed = job_state(store, scores, num_scored)[0] if job.needs_scores and state != "done" else "done"
            if state == "failed" or needed == "failed":
                failures[job.label] = detail or "its scores failed"
            elif state == "running" or needed == "running":
                waiting.append(job)  # another process holds it (or the scores it needs): come back later
                continue
            elif state == "missing" or not extra_done(job):
                bar.set_postfix_str(job.label)
                if not _execute(execute, job, failures):
                    waiting.append(job)
                    continue
            bar.update()
        if waiting and len(waiting) == len(todo):
            bar.set_postfix_str(f"waiting for {len(waiting)} jobs held by other processes")
            time.sleep(WAIT_POLL_S)
        todo = waiting
    bar.close()
    records = [store.load_run(job.key) for job in jobs(preset, dataset) if job.spec is not None]
    return SweepOutcome([r for r in records if r is not None], failures)


def _execute(execute: Callable[[Job], bool], job: Job, failures: dict[str, str]) -> bool:
    """Run one job (False: another process has it); a failure is noted (the sweep goes on), a user error ends the sweep."""
    try:
        return execute(job)
    except (UserError, KeyboardInterrupt):
        raise
    except RunFailed as error:
        failures[job.label] = str(error)
        log.error("%s", error)
    except Exception as error:  # not recorded in the store: a rerun tries the job again
        failures[job.label] = f"{type(error).__name__}: {error}"
        log.exception("%s failed unexpectedly", job.label)
    return True


def run_sweep(preset: Preset, store: Store, *, progress: bool = True, retry_failed: bool = False) -> SweepOutcome:
    """Run the whole grid in this process; stored runs are skipped, so this also just collects a finished sweep."""
    dataset = load_dataset(preset)

    def execute(job: Job) -> bool:
        if job.spec is None:
            compute_scores(preset, dataset, store, progress=progress)
        else:
            train_run(preset, dataset, job.spec.score, job.spec.sparsity, job.spec.seed, store)
        return True

    return _schedule(preset, dataset, store, execute, extra_done=lambda job: True, retry_failed=retry_failed,
                     progress=progress)


NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
KERNEL = "python3"
TITLES = {"analysis": "Results: {preset}", "scores": "Scores: {preset}"}


def execute_notebook(name: str, output: Path, parameters: dict, *, scratch: Path, title: str | None = None) -> None:
    """Run ``notebooks/<name>.ipynb`` with papermill; the executed copy appears at ``output`` only when done.

    Papermill writes the notebook as it runs into ``scratch`` (outside the book). In the copy, the
    parameter cells are tagged for removal from the book and ``title`` (if given) replaces the
    first heading, so that each preset's chapter is named after it.
    """
    import nbformat
    import papermill

    scratch.mkdir(parents=True, exist_ok=True)
    partial = scratch / f"{output.stem}.{os.getpid()}.partial.ipynb"
    try:
        notebook = papermill.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(partial), parameters=parameters,
                                              kernel_name=KERNEL, progress_bar=False, cwd=os.getcwd())
    finally:
        partial.unlink(missing_ok=True)
    for cell in notebook.cells:
        tags = cell.metadata.setdefault("tags", [])
        if {"parameters", "injected-parameters"} & set(tags):
            tags.append("remove-cell")
    if title:
        first = next(c for c in notebook.cells if c.cell_type == "markdown")
        first.source = "\n".join([f"# {title}", *first.source.splitlines()[1:]])
    atomic_write_bytes(output, nbformat.writes(notebook).encode())


def run_sweep_notebooks(preset: Preset, overrides: list[str], store: Store, book_runs: Path,
                        *, progress: bool = True, retry_failed: bool = False) -> SweepOutcome:
    """The sweep as executed notebooks under ``book_runs/<preset>/``: scores, one per run, then analysis.

    A job whose result and executed notebook both exist is skipped, so a rerun does only what is missing.
    """
    from papermill.exceptions import PapermillExecutionError

    folder = Path(book_runs) / preset.name
    scratch = store.checkpoint_path("notebooks")
    common = {"preset": preset.name, "store": str(Path(store.root).resolve()), "overrides": list(overrides)}

    def notebook(job: Job) -> Path:
        return folder / "scores.ipynb" if job.spec is None else folder / "train" / f"{job.spec.label}.ipynb"

    def execute(job: Job) -> bool:
        # The job itself is claimed inside the notebook's kernel; this claim stops a second sweep from
        # starting a kernel for the same job in the seconds before that.
        launch = store.try_claim(f"{job.key}-notebook")
        if launch is None:
            return False
        with launch:
            run_notebook(job)
        return True

    def run_notebook(job: Job) -> None:
        name, parameters = "scores", common
        if job.spec is not None:
            name = "train_sparse"
            parameters = {**common, "score": job.spec.score, "sparsity": job.spec.sparsity, "seed": job.spec.seed}
        try:
            execute_notebook(name, notebook(job), parameters, scratch=scratch,
                             title=TITLES.get(name, "").format(preset=preset.name) or None)
        except PapermillExecutionError as error:
            if error.ename == "UserError":
                raise UserError(error.evalue) from None
            if error.ename == "RunFailed":
                raise RunFailed(error.evalue) from None
            raise

    outcome = _schedule(preset, load_dataset(preset), store, execute, extra_done=lambda job: notebook(job).is_file(),
                        retry_failed=retry_failed, progress=progress)
    for name, path, parameters in (
            ("analysis", folder / "analysis.ipynb", {**common, "figures": str((folder / "figures").resolve())}),
            ("reproducibility", Path(book_runs) / "reproducibility.ipynb", {"store": common["store"]})):
        execute_notebook(name, path, parameters, scratch=scratch,
                         title=TITLES.get(name, "").format(preset=preset.name) or None)
    return outcome
