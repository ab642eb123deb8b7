"""Sweep jobs as Slurm job arrays through submitit (``pip install 'datadiet-nb[slurm]'``).

The missing scoring runs go in one array, their averaging in one job that starts after them, and the
training runs in arrays, those that need the scores after the averaging job. Dependencies are
``afterany``: a job whose dependency failed still starts, finds the failure in the store and records
its own. A job that Slurm preempts or that reaches its time limit is requeued by submitit (the
``checkpoint`` below) and resumes from its checkpoint in the store. The store must be on a filesystem
every node sees; the submitted job ids are kept in ``<store>/slurm/jobs.json`` for ``status``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path


from .. import progress as progress_bars
from ..errors import UserError
from ..presets import Preset
from ..store import Store, read_json, write_json
from ..sweep import Job, job_state, load_dataset, pending, run_remote_job, scored_dataset

POLL_S = 5.0  # how often --wait looks at the queue and the store
COMMAND_TIMEOUT_S = 60
SLURM_COMMANDS = ("sbatch", "squeue", "sinfo", "scontrol")

log = logging.getLogger("datadiet_nb")


@dataclass(frozen=True)
class SlurmOptions:
    """Where and how the jobs are submitted."""

    partition: str | None
    gpus_per_job: int | None = None  # None: 1, or 0 for a preset that asks for the CPU
    cpus_per_job: float = 1.0
    timeout_min: int = 240
    max_parallel: int = 64
    wait: bool = False

    def validate(self) -> None:
        missing = [command for command in SLURM_COMMANDS if shutil.which(command) is None]
        if missing:
            raise UserError(f"--executor slurm needs the Slurm commands, but {missing[0]} is not on PATH")
        if not self.partition:
            raise UserError("--executor slurm needs --slurm-partition")
        partitions = [p.rstrip("*") for p in _slurm(["sinfo", "-h", "-o", "%P"]).split()]
        if self.partition not in partitions:
            raise UserError(f"Slurm has no partition {self.partition!r}; it has {partitions}")
        if self.gpus_per_job is not None and self.gpus_per_job < 0:
            raise UserError(f"--slurm-gpus-per-job must be >= 0, got {self.gpus_per_job}")
        if self.cpus_per_job <= 0 or self.timeout_min < 1 or self.max_parallel < 1:
            raise UserError("--cpus-per-job must be > 0, --slurm-timeout-min and --slurm-max-parallel >= 1")


def _slurm(command: list[str]) -> str:
    """A Slurm command's output; its failure becomes one line."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise UserError(f"{command[0]} failed: {error}") from None
    if result.returncode != 0:
        raise UserError(f"{' '.join(command[:2])} failed: {result.stderr.strip().splitlines()[-1:] or result.returncode}")
    return result.stdout


class RequeueableJob:
    """A sweep job as a Slurm job. When Slurm preempts it or its time runs out, submitit calls
    :meth:`checkpoint` and requeues the same call, which resumes from the job's checkpoint in the store."""

    def __call__(self, preset: Preset, store_root: str, claim_timeout: float | None,
                 job: Job) -> tuple[str, str | None]:
        import torch
        # Slurm without cgroups does not confine a job to its CPUs; more threads than CPUs thrash
        torch.set_num_threads(int(os.environ.get("SLURM_CPUS_PER_TASK", torch.get_num_threads())))
        return run_remote_job(preset, store_root, claim_timeout, job)

    def checkpoint(self, *args, **kwargs):
        from submitit.helpers import DelayedSubmission
        return DelayedSubmission(self, *args, **kwargs)


def jobs_file(store: Store) -> Path:
    return store.root / "slurm" / "jobs.json"


def submitted_jobs(store: Store) -> dict[str, dict]:
    """Store key -> the Slurm job last submitted for it (``slurm_id``, ``label``, ``submitted``, ``log``)."""
    try:
        return read_json(jobs_file(store))
    except (OSError, ValueError):
        return {}


def queue() -> dict[str, str]:
    """This user's Slurm jobs now in the queue: job id (``123`` or ``123_4``) -> state (``PENDING``, ``RUNNING``...)."""
    if shutil.which("squeue") is None:
        return {}
    lines = _slurm(["squeue", "-h", "-r", "--me", "-o", "%i %T"]).splitlines()
    return dict(line.split(maxsplit=1) for line in lines if line.strip())


def run(preset: Preset, store: Store, options: SlurmOptions, *, progress: bool = True) -> dict[str, str]:
    """Submit every job of the preset that is neither done, failed nor still queued; with ``options.wait``, follow
    them to the end. Returns the new failures by job label (:func:`~datadiet_nb.sweep.collect` adds the recorded)."""
    try:
        import submitit
    except ImportError:
        raise UserError("--executor slurm needs submitit: pip install 'datadiet-nb[slurm]'") from None
    log.warning("the Slurm jobs write to %s: it must be on a filesystem every node of partition %s sees",
                store.root.resolve(), options.partition)
    dataset = load_dataset(preset)
    in_queue, submitted_before = queue(), submitted_jobs(store)
    todo, followed, slurm_ids = [], [], {}
    for job in pending(preset, dataset, store):
        queued = submitted_before.get(job.key, {}).get("slurm_id")
        if queued in in_queue:
            slurm_ids[job.key] = queued  # submitted by an earlier sweep and still queued: followed, not resubmitted
            followed.append(job)
        else:
            todo.append(job)
    executor = submitit.SlurmExecutor(folder=store.root.resolve() / "slurm" / "logs")
    gpus = options.gpus_per_job if options.gpus_per_job is not None else (0 if preset.device == "cpu" else 1)
    executor.update_parameters(partition=options.partition, time=options.timeout_min, gpus_per_node=gpus or None,
                               cpus_per_task=math.ceil(options.cpus_per_job), array_parallelism=options.max_parallel,
                               job_name=f"datadiet-{preset.name}")
    for stage in _stages(todo):
        needed = sorted({slurm_ids[key] for job in stage for key in job.needs if key in slurm_ids})
        executor.update_parameters(dependency=f"afterany:{':'.join(needed)}" if needed else None)
        with executor.batch():
            submitted = [executor.submit(RequeueableJob(), preset, str(store.root.resolve()), store.claim_timeout, job)
                         for job in stage]
        for job, handle in zip(stage, submitted):
            slurm_ids[job.key] = handle.job_id
    _record(store, {job.key: slurm_ids[job.key] for job in todo}, {job.key: job.label for job in todo})
    if todo:
        log.warning("submitted %d Slurm jobs (%s)", len(todo),
                    ", ".join(sorted({_base(slurm_ids[job.key]) for job in todo}, key=int)))
    if followed:
        log.warning("%d jobs submitted earlier are still queued; not submitted again", len(followed))
    return follow(preset, store, followed + todo, slurm_ids, progress=progress) if options.wait else {}


def _stages(todo: list[Job]) -> list[list[Job]]:
    """The jobs in submission order, grouped into arrays: each job's dependencies in an earlier group."""
    kinds = [[j for j in todo if j.kind == "scoring-run"], [j for j in todo if j.kind == "scores"],
             [j for j in todo if j.kind == "run" and not j.needs], [j for j in todo if j.kind == "run" and j.needs]]
    return [stage for stage in kinds if stage]


def _record(store: Store, slurm_ids: dict[str, str], labels: dict[str, str]) -> None:
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    known = submitted_jobs(store)
    for key, slurm_id in slurm_ids.items():
        known[key] = {"slurm_id": slurm_id, "label": labels[key], "submitted": now,
                      "log": str(store.root.resolve() / "slurm" / "logs" / f"{slurm_id}_0_log.err")}
    write_json(jobs_file(store), known)


def follow(preset: Preset, store: Store, todo: list[Job], slurm_ids: dict[str, str], *,
           progress: bool = True) -> dict[str, str]:
    """Wait until every submitted job is done or failed in the store, or has left the queue without a result."""
    num_scored = scored_dataset(preset, load_dataset(preset)).num_train
    failures: dict[str, str] = {}
    bar = progress_bars.bar(enabled=progress, total=len(todo), desc=f"sweep {preset.name} on Slurm", unit="job")
    waiting = list(todo)
    while waiting:
        in_queue = queue()  # read before the store: a job absent here and without a result there has ended
        still = []
        for job in waiting:
            state, detail = job_state(store, job, num_scored)
            if state in ("done", "failed"):
                if state == "failed":
                    failures[job.label] = detail
                bar.update()
            elif slurm_ids[job.key] not in in_queue and _base(slurm_ids[job.key]) not in in_queue:
                failures[job.label] = (f"Slurm job {slurm_ids[job.key]} ended without a result; see "
                                       f"{submitted_jobs(store).get(job.key, {}).get('log', 'its log')}")
                bar.update()
            else:
                still.append(job)
        waiting = still
        if waiting:
            time.sleep(POLL_S)
    bar.close()
    return failures


def _base(slurm_id: str) -> str:
    return slurm_id.split("_")[0]


def describe(store: Store, key: str, in_queue: dict[str, str]) -> str:
    """``slurm <id> <STATE>`` for a job submitted from this store (``gone`` once it left the queue), else ''."""
    submitted = submitted_jobs(store).get(key)
    if submitted is None:
        return ""
    slurm_id = submitted["slurm_id"]
    return f"slurm {slurm_id} {in_queue.get(slurm_id, 'gone from the queue')}"


def annotate(store: Store, states: list[tuple[Job, str, str]]) -> list[tuple[Job, str, str]]:
    """:func:`~datadiet_nb.sweep.status` with, for each job not done that was submitted from this store, its Slurm
    job and state (``slurm <id> <STATE>``); unchanged when nothing was submitted to Slurm from it."""
    if not jobs_file(store).is_file():
        return states
    try:
        in_queue = queue()
    except UserError as error:  # the controller is down or this is another machine: say so, show the store
        log.warning("%s", error)
        in_queue = {}
    return [(job, state, detail if state == "done" else " ".join(filter(None, [
        detail, describe(store, job.key, in_queue)]))) for job, state, detail in states]
