"""Sweep jobs as Ray tasks, on a local Ray instance or a Ray cluster (``pip install 'datadiet-nb[ray]'``).

Each job is one task; a task waits for the tasks of the jobs it needs (Ray resolves them before it
starts). A task whose worker dies is retried by Ray; the retry finds the dead worker's claim stale and
resumes the job from its checkpoint (or finds its record). Ray does not isolate GPU memory: with
``gpus_per_job=0.25`` four runs share one GPU and must fit in its memory together.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import socket
from dataclasses import dataclass


from .. import progress as progress_bars
from ..errors import UserError
from ..presets import Preset
from ..store import Store
from ..sweep import load_dataset, pending, run_remote_job

TASK_RETRIES = 3  # times Ray reruns a task whose worker process or node died
CONNECT_TIMEOUT_S = 5.0
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20  # tasks pass keys and short messages only
DEFAULT_CLIENT_PORT = 10001

log = logging.getLogger("datadiet_nb")


@dataclass(frozen=True)
class RayOptions:
    """Where and how the tasks run: ``address`` None starts a local Ray instance with this machine's
    resources, ``auto`` or ``host:port`` or ``ray://host:port`` joins a cluster."""

    address: str | None = None
    gpus_per_job: float | None = None  # None: 1 where the cluster has GPUs and the preset does not ask for the CPU
    cpus_per_job: float = 1.0

    def validate(self) -> None:
        if self.gpus_per_job is not None:
            if self.gpus_per_job <= 0:
                raise UserError(f"--gpus-per-job must be > 0, got {self.gpus_per_job:g}")
            if self.gpus_per_job > 1 and self.gpus_per_job != int(self.gpus_per_job):
                raise UserError(f"--gpus-per-job above 1 must be a whole number of GPUs, got {self.gpus_per_job:g}")
        if self.cpus_per_job <= 0:
            raise UserError(f"--cpus-per-job must be > 0, got {self.cpus_per_job:g}")
        if self.address not in (None, "auto"):
            check_reachable(self.address)


def check_reachable(address: str) -> None:
    """Fail in one line, within seconds, when nothing listens at a Ray address (Ray itself retries for minutes)."""
    host_port = address.removeprefix("ray://")
    host, _, port = host_port.rpartition(":")
    if not host:
        host, port = host_port, str(DEFAULT_CLIENT_PORT if address.startswith("ray://") else 6379)
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except (OSError, ValueError) as error:
        raise UserError(f"cannot reach the Ray cluster at {address}: {error}") from None


def _ray():
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'datadiet-nb[ray]'") from None
    return ray


def run(preset: Preset, store: Store, options: RayOptions, *, progress: bool = True) -> dict[str, str]:
    """Run every job of the preset that is neither done nor failed as a Ray task; returns the new failures by label."""
    options.validate()
    ray = _ray()
    local = options.address is None
    try:
        ray.init(address=options.address, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR, **({"object_store_memory": LOCAL_OBJECT_STORE_BYTES} if local else {}))
    except ConnectionError as error:
        raise UserError(f"cannot join the Ray cluster at {options.address}: {error}") from None
    try:
        return _run_tasks(ray, preset, store, options, progress)
    finally:
        ray.shutdown()  # a local instance stops; a cluster is only disconnected from


def gpus_per_job(available: dict, preset: Preset, options: RayOptions) -> float:
    """The GPUs each task asks Ray for, given the cluster's resources: the option, else 1 where the cluster has
    GPUs and the preset does not ask for the CPU, else 0; refused in one line where no node could grant it."""
    gpus = options.gpus_per_job
    if gpus is None:
        gpus = 1.0 if available.get("GPU", 0) >= 1 and preset.device != "cpu" else 0.0
    if gpus > available.get("GPU", 0):
        raise UserError(f"--gpus-per-job {gpus:g} but the Ray cluster has {available.get('GPU', 0):g} GPUs")
    if options.cpus_per_job > available.get("CPU", 0):
        raise UserError(f"--cpus-per-job {options.cpus_per_job:g} but the Ray cluster has "
                        f"{available.get('CPU', 0):g} CPUs")
    return gpus


def jobs_at_once(available: dict, gpus: float, cpus: float) -> int:
    """How many tasks the cluster runs at the same time: as many as its GPUs and its CPUs both allow
    (``gpus=0.25``: four to a GPU). Counted over the cluster's totals; Ray packs per node, so a task that
    needs more than one node has free runs fewer."""
    by_cpu = math.floor(available.get("CPU", 0) / cpus + 1e-9)
    return min(by_cpu, math.floor(available.get("GPU", 0) / gpus + 1e-9)) if gpus else by_cpu


def job_preset(preset: Preset, gpus: float) -> Preset:
    """The preset a task runs: on the CPU when it was granted no GPU (Ray leaves a task without GPUs the whole
    CUDA_VISIBLE_DEVICES of its node, so ``auto`` would take a GPU another task holds). The device is not part of
    any store key, so the results are found alike."""
    return dataclasses.replace(preset, device="cpu") if gpus == 0 and preset.device == "auto" else preset


def _run_tasks(ray, preset: Preset, store: Store, options: RayOptions, progress: bool) -> dict[str, str]:
    available = ray.cluster_resources()
    gpus = gpus_per_job(available, preset, options)
    log.info("Ray runs %d jobs at once (%g GPUs and %g CPUs each)", jobs_at_once(available, gpus, options.cpus_per_job),
             gpus, options.cpus_per_job)
    task = ray.remote(num_cpus=options.cpus_per_job, num_gpus=gpus, max_retries=TASK_RETRIES,
                      retry_exceptions=False)(run_remote_job)
    runs_as = job_preset(preset, gpus)
    root = str(store.root.resolve())
    refs, label_of, failures = {}, {}, {}
    for job in pending(preset, load_dataset(preset), store):
        needed = [refs[key] for key in job.needs if key in refs]  # Ray starts the task once these are done
        ref = task.options(name=job.label).remote(runs_as, root, store.claim_timeout, job, *needed)
        refs[job.key], label_of[ref] = ref, job.label
    running = list(label_of)
    bar = progress_bars.bar(enabled=progress, total=len(running), desc=f"sweep {preset.name} on Ray", unit="job")
    while running:
        finished, running = ray.wait(running, num_returns=1)
        for ref in finished:
            label = label_of[ref]
            try:
                _, message = ray.get(ref)  # (the job's store key, why it failed or None)
            except ray.exceptions.RayError as error:  # its worker died more than TASK_RETRIES times
                message = f"{type(error).__name__}: {str(error).splitlines()[0]}"
            if message is not None:
                failures[label] = message
            bar.set_postfix_str(label)
            bar.update()
    bar.close()
    return failures
