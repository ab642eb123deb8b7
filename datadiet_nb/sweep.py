"""The grid of a preset ([training-set size x] score x sparsity x seed) as jobs, their state in a store, and running what is missing.

The jobs are the K scoring runs, their averaging into the preset's scores, and the training runs
(those that prune by a score need the scores). This module runs them in this process (``inline``)
(:mod:`.executors` runs them as papermill notebooks, Ray tasks or a Slurm array). Any number of sweeps, on
any executors, may share one store: each job is computed under a claim (see :mod:`.claims`), a
sweep skips jobs that another process is computing and comes back for them, so the work is split
and nothing runs twice. A killed sweep, run again, finds its finished jobs stored and resumes the
unfinished ones from their checkpoints.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable

from .experiment import (RunFailed, compute_scores, compute_scoring_run, load_dataset, run_config, scored_dataset,
                         scores_config, scoring_run_key, train_run)
from . import progress as progress_bars
from .data import Dataset
from .presets import DENSE, Preset
from .prune import RULES
from .errors import UserError
from .store import WAIT_POLL_S, Store, config_key

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
    """One unit of work of a sweep: a scoring run, the averaging of the scoring runs (the preset's scores),
    or one training run; ``needs`` holds the keys of the jobs that must be done before it."""

    key: str
    spec: RunSpec | None = None  # a training run's (score, sparsity, seed)
    scoring_seed: int | None = None  # a scoring run's seed
    needs: tuple[str, ...] = ()
    size: int | None = None  # a training run's training-set size per class, on a preset with train_sizes

    @property
    def kind(self) -> str:
        return "run" if self.spec else "scoring-run" if self.scoring_seed is not None else "scores"

    @property
    def label(self) -> str:
        if self.spec:
            return self.spec.label if self.size is None else f"n{self.size}-{self.spec.label}"
        return f"scoring-run-seed{self.scoring_seed}" if self.scoring_seed is not None else "scores"


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


def jobs(preset: Preset, dataset: Dataset) -> list[Job]:
    """The K scoring runs and their averaging (if any score needs them), then every run (of each training-set
    size, smallest first, when the preset has ``train_sizes``); each job after the jobs it needs, so running them
    in this order never waits. The sizes share the scores, which cover the full training set."""
    if not preset.train_sizes:
        return _grid_jobs(preset, dataset)
    result: dict[str, Job] = {}
    for size in sorted(preset.train_sizes):
        for job in _grid_jobs(*job_context(preset, dataset, size), size=size):
            result.setdefault(job.key, job)
    return list(result.values())


def job_context(preset: Preset, dataset: Dataset, size: int | None) -> tuple[Preset, Dataset]:
    """The preset and dataset a job of training-set size ``size`` runs with (None: the preset's own)."""
    if size is None:
        return preset, dataset
    return preset.at_size(size), dataset.with_train_per_class(size)


def _grid_jobs(preset: Preset, dataset: Dataset, size: int | None = None) -> list[Job]:
    result: list[Job] = []
    scores_key = config_key(scores_config(preset, dataset))
    if any(RULES[s] is not None for s in preset.scores):
        runs = [Job(scoring_run_key(scores_key, seed), scoring_seed=seed) for seed in preset.scoring_seeds()]
        result += [*runs, Job(scores_key, needs=tuple(job.key for job in runs))]
    for spec in plan(preset):
        key = config_key(run_config(preset, dataset, spec.score, spec.sparsity, spec.seed))
        result.append(Job(key, spec, needs=(scores_key,) if RULES.get(spec.score) is not None else (), size=size))
    return result


def job_state(store: Store, job: Job, num_scored: int) -> tuple[str, str]:
    """(``done`` | ``failed`` | ``running`` | ``missing``, detail) of one job in the store
    (``num_scored``: the examples the scores cover, see :func:`~.experiment.scored_dataset`)."""
    if job.kind == "run":
        done = store.load_run(job.key) is not None
    elif job.kind == "scores":
        done = store.load_scores(job.key, num_scored) is not None
    else:  # a finished scoring run waits in a file until the runs are averaged; afterwards the scores hold it
        done = (store.checkpoint_path(f"{job.key}.scores.npz").is_file()
                or store.load_scores(job.key.rpartition("-seed")[0], num_scored) is not None)
    if done:
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
    """Every job of the preset with its state and detail, from the store (an executor may add to the detail:
    :func:`datadiet_nb.executors.slurm.annotate`)."""
    dataset = load_dataset(preset)
    num_scored = scored_dataset(preset, dataset).num_train
    return [(job, *job_state(store, job, num_scored)) for job in jobs(preset, dataset)]


def pending(preset: Preset, dataset: Dataset, store: Store) -> list[Job]:
    """The jobs an executor still has to run, in plan order: neither done nor recorded as failed (:func:`collect`
    reports those)."""
    num_scored = scored_dataset(preset, dataset).num_train
    return [job for job in jobs(preset, dataset) if job_state(store, job, num_scored)[0] not in ("done", "failed")]


def collect(preset: Preset, dataset: Dataset, store: Store, failures: dict[str, str]) -> SweepOutcome:
    """The sweep's stored records in plan order, and every failure (those the executor saw and those recorded)."""
    records, failed = [], dict(failures)
    for job in jobs(preset, dataset):
        if job.kind == "run" and (record := store.load_run(job.key)) is not None:
            records.append(record)
        elif job.label not in failed and (failure := store.load_failure(job.key)) is not None:
            failed[job.label] = failure.get("message", "")
    return SweepOutcome(records, failed)


def default_workers(preset: Preset) -> int:
    """How many jobs a sweep runs at once on this machine: one per core on a CPU, one on a GPU (jobs would
    share it)."""
    import torch

    on_gpu = preset.device.startswith("cuda") or (preset.device == "auto" and torch.cuda.is_available())
    return 1 if on_gpu else max(1, os.cpu_count() or 1)


def threads_per_worker(workers: int) -> int:
    """Torch threads for each of ``workers`` jobs running at once: a share of the cores each (not all of them
    each, which would make the jobs fight over the cores)."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def _schedule(preset: Preset, dataset: Dataset, store: Store, execute: Callable[[Job], bool], *,
              extra_done: Callable[[Job], bool], progress: bool, workers: int = 1) -> dict[str, str]:
    """Run every job that is not done, ``workers`` at a time, skipping (and coming back for) those another
    process holds.

    ``execute`` computes one job (in this process, in a worker process or in a notebook), or returns False
    when another process is already on it; with ``workers`` > 1 it is called from that many threads at once.
    ``extra_done`` says whether the executor's own output for a stored job exists too (its executed notebook).
    A job starts once the jobs it needs are done. A failed job is reported and the others go on; a user error
    (e.g. a full disk) stops the sweep. Returns the failures, by job label.
    """
    todo = jobs(preset, dataset)
    by_key = {job.key: job for job in todo}
    num_scored = scored_dataset(preset, dataset).num_train
    failures: dict[str, str] = {}
    bar = progress_bars.bar(enabled=progress, total=len(todo), desc=f"sweep {preset.name}", unit="job")
    running: dict[Future, Job] = {}
    threads = ThreadPoolExecutor(workers, thread_name_prefix="sweep-job") if workers > 1 else None

    def finished(job: Job, started: bool) -> None:
        if started:
            bar.update()
        else:
            todo.append(job)  # another process took it first: come back for it

    try:
        while todo or running:
            waiting, held, in_flight = [], 0, {job.key for job in running.values()}
            for job in todo:
                if len(running) >= workers or job.key in in_flight or in_flight & set(job.needs):
                    waiting.append(job)  # no free worker, or a job it needs is running here: later
                    continue
                state, detail = job_state(store, job, num_scored)
                needed = [job_state(store, by_key[k], num_scored)[0] for k in job.needs] if state != "done" else []
                # a need that failed in this sweep counts only while its output is missing: a scores notebook
                # that fails in a figure after storing its scores leaves the scores usable
                need_failed = any(by_key[k].label in failures and need != "done"
                                  for k, need in zip(job.needs, needed))
                if state == "failed" or "failed" in needed or need_failed:
                    failures[job.label] = detail or "a job it needs failed"
                elif state == "running" or "running" in needed:
                    waiting.append(job)  # another process holds it (or a job it needs): come back later
                    held += 1
                    continue
                elif any(need != "done" for need in needed):
                    waiting.append(job)  # a job it needs is still to run here: a worker waiting on it inside
                    continue  # the job would sit idle while others could run
                elif state == "missing" or not extra_done(job):
                    bar.set_postfix_str(job.label)
                    if threads is None:
                        if not _execute(execute, job, failures):
                            waiting.append(job)
                            held += 1
                            continue
                    else:
                        running[threads.submit(_execute, execute, job, failures)] = job
                        continue
                bar.update()
            todo = waiting
            if running:
                done, _ = wait(running, timeout=WAIT_POLL_S if held else None, return_when=FIRST_COMPLETED)
                for future in done:
                    finished(running.pop(future), future.result())  # a user error raised in a worker ends here
            elif todo and held == len(todo):
                bar.set_postfix_str(f"waiting for {len(todo)} jobs held by other processes")
                time.sleep(WAIT_POLL_S)
    finally:
        if threads is not None:
            threads.shutdown(wait=False, cancel_futures=True)
        bar.close()
    return failures


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


_DATASETS: dict[tuple, Dataset] = {}  # a worker process running many jobs loads each dataset once


def _dataset_of(preset: Preset) -> Dataset:
    key = (preset.dataset, preset.train_per_class)
    if key not in _DATASETS:
        _DATASETS[key] = load_dataset(preset)
    return _DATASETS[key]


def run_job(preset: Preset, dataset: Dataset, store: Store, job: Job, *, progress: bool = False) -> None:
    """Compute one job of the sweep in this process: the body every executor runs, wherever it runs it."""
    preset, dataset = job_context(preset, dataset, job.size)
    if job.kind == "scoring-run":
        compute_scoring_run(preset, dataset, store, job.scoring_seed, progress=progress)
    elif job.kind == "scores":
        compute_scores(preset, dataset, store, progress=progress)
    else:
        train_run(preset, dataset, job.spec.score, job.spec.sparsity, job.spec.seed, store, progress=progress)


def run_remote_job(preset: Preset, store_root: str, claim_timeout: float | None, job: Job,
                   *needed) -> tuple[str, str | None]:
    """A job on a worker of a Ray cluster or a Slurm array: (its store key, None when done or else why it failed,
    as recorded in the store). Only this short answer travels back; results stay in the store. ``needed``: the
    answers of the jobs it needs, which an engine passes so as to start it after them (unused: the store has them)."""
    try:
        run_job(preset, _dataset_of(preset), Store(store_root, claim_timeout=claim_timeout), job)
    except (RunFailed, UserError) as error:
        return job.key, str(error)
    return job.key, None


def clear_failures(preset: Preset, dataset: Dataset, store: Store) -> None:
    """Forget the recorded failures of a preset's jobs, so that a sweep tries them again (``--retry-failed``)."""
    for job in jobs(preset, dataset):
        store.clear_failure(job.key)


def sweep_with(run: Callable[[], dict[str, str]], preset: Preset, store: Store, *, retry_failed: bool) -> SweepOutcome:
    """A sweep on an executor: ``run`` runs the preset's missing jobs somewhere and returns the failures it saw."""
    dataset = load_dataset(preset)
    if retry_failed:
        clear_failures(preset, dataset, store)
    return collect(preset, dataset, store, run())


def _start_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _run_in_worker(preset: Preset, store_root: str, claim_timeout: float | None, job: Job) -> bool:
    run_job(preset, _dataset_of(preset), Store(store_root, claim_timeout=claim_timeout), job)
    return True


def run_sweep(preset: Preset, store: Store, *, progress: bool = True, retry_failed: bool = False,
              workers: int = 1) -> SweepOutcome:
    """Run the whole grid on this machine: in this process, or with ``workers`` > 1 in that many worker processes
    (each with a share of the cores, :func:`threads_per_worker`); stored runs are skipped, so this also just
    collects a finished sweep."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    dataset = load_dataset(preset)
    if retry_failed:
        clear_failures(preset, dataset, store)
    if workers <= 1:
        def execute(job: Job) -> bool:
            run_job(preset, dataset, store, job, progress=progress and job.kind != "run")
            return True

        failures = _schedule(preset, dataset, store, execute, extra_done=lambda job: True, progress=progress)
        return collect(preset, dataset, store, failures)
    # spawned, not forked: a fork of a process whose torch has started its thread pool can hang
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                               initargs=(threads_per_worker(workers),))
    try:
        failures = _schedule(preset, dataset, store,
                             lambda job: pool.submit(_run_in_worker, preset, str(store.root), store.claim_timeout,
                                                     job).result(),
                             extra_done=lambda job: True, progress=progress, workers=workers)
    except BaseException:
        for process in list(getattr(pool, "_processes", {}).values()):  # a job may run for hours: do not wait
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return collect(preset, dataset, store, failures)
