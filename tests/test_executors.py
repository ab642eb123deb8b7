"""The sweep on real engines: a local Ray cluster of worker processes and a single-node Slurm started here.

Each executor must give the same study as ``inline`` (same seeds, CPU: bit for bit), start every job
once, survive a worker killed mid-run, and leave a store any other executor can finish.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from datadiet_nb import presets
from datadiet_nb.cli import main
from datadiet_nb.experiment import load_dataset
from datadiet_nb.store import Store
from datadiet_nb.sweep import jobs, run_sweep
from helpers import DIVERGE_IN_EVERY_PROCESS, assert_same_study, interruptible, predictions_by_key, study_toml
from slurm_cluster import PARTITION, missing_tools, single_node_slurm

# Long enough (30 passes, a checkpoint after each) that a kill can land mid-run; seconds on a CPU.
STUDY = study_toml(epochs=30)
WAIT_LIMIT_S = 300


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_job():
    """Every process of this module trains on one torch thread, as a Ray task or Slurm job of one CPU does: on
    some CPUs (AMD EPYC here) a different thread count changes the last bits of the weights, and each executor
    must give the inline sweep's study bit for bit."""
    previous = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def study(tmp_path_factory, one_thread_per_job) -> tuple[Path, Path]:
    """(the study's preset file, its store swept inline without interruption, on one thread)."""
    folder = tmp_path_factory.mktemp("study")
    (folder / "study.toml").write_text(STUDY)
    outcome = run_sweep(presets.get(str(folder / "study.toml")), Store(folder / "reference"), progress=False)
    assert not outcome.failures and len(outcome.records) == 4
    return folder / "study.toml", folder / "reference"


def sweep(preset: Path, store: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "datadiet_nb.cli", "sweep", "--preset", str(preset), "--store", str(store),
            "--quiet", *options]


def starts(store: Path) -> list[tuple[str, str]]:
    """(pid, key) of every job start in the store's events log."""
    lines = (store / "events.log").read_text().splitlines()
    return [(e[2], e[4]) for e in (line.split() for line in lines) if e[3] == "start"]


def job_keys(preset: Path) -> dict[str, str]:
    """label -> key of every job of the study."""
    p = presets.get(str(preset))
    return {job.label: job.key for job in jobs(p, load_dataset(p))}


def wait_for(condition, what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + WAIT_LIMIT_S
    while not condition():
        assert process is None or process.poll() is None, f"the sweep ended before {what}: {process.stderr.read()}"
        assert time.monotonic() < deadline, f"no {what} within {WAIT_LIMIT_S} s"
        time.sleep(0.02)


def mid_run(store: Path, keys: dict[str, str]) -> str | None:
    """The key of a training run that has saved a checkpoint and not finished (so a kill lands mid-run)."""
    for label, key in keys.items():
        if "-s0.5-" in label and (store / "checkpoints" / f"{key}.pt").is_file():
            return key
    return None


def holder_pid(store: Path, key: str) -> int:
    import json
    return json.loads((store / "claims" / f"{key}.claim").read_text())["pid"]


# --- Ray -----------------------------------------------------------------------------------------

RAY = ["--executor", "ray", "--cpus-per-job", "1"]  # a local Ray instance: 2 CPUs here, so 2 worker processes


def test_a_ray_sweep_equals_inline_and_starts_each_job_once(study, tmp_path):
    preset, reference = study
    store = tmp_path / "runs"
    result = subprocess.run(sweep(preset, store, *RAY), capture_output=True, text=True, timeout=WAIT_LIMIT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_study(store, reference)
    started = starts(store)
    assert sorted(key for _, key in started) == sorted(job_keys(preset).values())  # each job once
    workers = {pid for pid, _ in started}
    assert len(workers) >= 2 and str(os.getpid()) not in workers, "the jobs ran in Ray's worker processes"
    # the printed table is the inline sweep's
    inline = subprocess.run(sweep(preset, tmp_path / "inline", "--executor", "inline"), capture_output=True,
                            text=True, timeout=WAIT_LIMIT_S)
    assert inline.returncode == 0
    assert result.stdout.split(" s)\n", 1)[1] == inline.stdout.split(" s)\n", 1)[1]


def test_a_ray_worker_killed_mid_run_is_retried_and_the_run_resumes(study, tmp_path):
    preset, reference = study
    store, keys = tmp_path / "runs", job_keys(study[0])
    process = subprocess.Popen(sweep(preset, store, *RAY), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: mid_run(store, keys), "training run mid-way", process)
        killed = mid_run(store, keys)
        os.kill(holder_pid(store, killed), signal.SIGKILL)  # the Ray worker process running that run
        out, err = process.communicate(timeout=WAIT_LIMIT_S)
    finally:
        process.kill()
    assert process.returncode == 0, err[-3000:]
    assert_same_study(store, reference)
    started = [key for _, key in starts(store)]
    assert started.count(killed) == 2 and all(started.count(k) == 1 for k in keys.values() if k != killed)
    [record] = [r for r in Store(store).records() if r["key"] == killed]
    assert record["train"]["resumes"] and record["train"]["resumes"][0] > 0, "the retry resumed from the checkpoint"


def test_a_sweep_interrupted_under_ray_is_finished_inline_redoing_nothing(study, tmp_path):
    preset, reference = study
    store = tmp_path / "runs"
    process = subprocess.Popen(sweep(preset, store, *RAY), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=interruptible)
    try:
        wait_for(lambda: len(list((store / "runs").glob("*.json"))) >= 1, "finished run", process)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=WAIT_LIMIT_S)
    finally:
        process.kill()
    assert process.returncode == 130, err[-3000:]
    finished = set(predictions_by_key(store))
    assert 1 <= len(finished) < 4
    before = len(starts(store))
    outcome = run_sweep(presets.get(str(preset)), Store(store), progress=False)
    assert not outcome.failures
    redone = [key for _, key in starts(store)[before:]]
    assert redone and not set(redone) & finished, "the inline sweep redid a run Ray had finished"
    assert_same_study(store, reference)


def test_a_run_failing_on_a_ray_worker_is_recorded_and_listed_and_the_others_finish(study, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(DIVERGE_IN_EVERY_PROCESS.format(score="grand"))  # in every worker too
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    store = tmp_path / "runs"
    result = subprocess.run(sweep(study[0], store, *RAY), capture_output=True, text=True, timeout=WAIT_LIMIT_S,
                            env=env)
    assert result.returncode == 1, result.stderr[-3000:]
    failed = [line.strip() for line in result.stderr.splitlines() if line.startswith("  grand-")]
    assert len(failed) == 1 and failed[0].startswith("grand-s0.5-seed0: run grand s=0.5 seed=0 failed: training "
                                                     "loss became nan"), result.stderr[-3000:]
    assert len(list((store / "failed").glob("*.json"))) == 1
    assert sorted(r["score"] for r in Store(store).records()) == ["dense", "el2n", "random"]


# --- bad input -----------------------------------------------------------------------------------

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("options, message", [
    (["--executor", "dask"], "argument --executor: invalid choice: 'dask'"),
    (["--executor", "ray", "--ray-address", f"127.0.0.1:{_closed_port()}"], "cannot reach the Ray cluster at 127.0.0.1:"),
    (["--executor", "ray", "--gpus-per-job", "0"], "--gpus-per-job must be > 0, got 0"),
    (["--executor", "ray", "--gpus-per-job", "-0.5"], "--gpus-per-job must be > 0, got -0.5"),
    (["--executor", "ray", "--gpus-per-job", "1.5"], "--gpus-per-job above 1 must be a whole number of GPUs, got 1.5"),
    (["--executor", "ray", "--cpus-per-job", "0"], "--cpus-per-job must be > 0, got 0"),
    (["--executor", "slurm"], "--executor slurm needs"),
    (["--executor", "inline", "--workers", "0"], "argument --workers: must be a whole number > 0, got '0'"),
    (["--workers", "two"], "argument --workers: must be a whole number > 0, got 'two'"),
])
def test_bad_executor_options_get_one_line_and_exit_2_leaving_the_store_untouched(study, tmp_path, capsys, options,
                                                                                  message):
    """In this process (the command's own process, its traceback-free exit, is tested in test_cli); the
    unreachable Ray cluster in a process of its own, so that this one's Ray stays uninitialised."""
    store = tmp_path / "runs"
    argv = sweep(study[0], store, *options)
    if "--ray-address" in options:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        status, stderr = result.returncode, result.stderr
    else:
        try:
            status = main(argv[3:])
        except SystemExit as exit:
            status = exit.code
        stderr = capsys.readouterr().err
    assert status == 2, stderr
    [line] = stderr.strip().splitlines()
    assert message in line
    assert not store.exists()


def test_an_inline_sweep_on_two_worker_processes_gives_the_one_process_study(study, tmp_path, monkeypatch):
    """Two worker processes of one torch thread each (the share of 2 cores, as the reference's one thread)."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    store = tmp_path / "workers"
    outcome = run_sweep(presets.get(str(study[0])), Store(store), progress=False, workers=2)
    assert not outcome.failures and len(outcome.records) == 4
    assert {record["provenance"]["torch_threads"] for record in outcome.records} == {1}
    assert_same_study(store, study[1])


# --- Slurm ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A real single-node Slurm for this module's tests; skipped, in one line, where it cannot run."""
    if missing_tools():
        pytest.skip(f"Slurm is not installed ({missing_tools()[0]} missing): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("starting the Slurm daemons needs root")
    try:
        with single_node_slurm(tmp_path_factory.mktemp("slurm")) as env:
            with pytest.MonkeyPatch.context() as patch:
                for name, value in env.items():
                    patch.setenv(name, value)
                yield env
    except RuntimeError as error:
        pytest.skip(f"the Slurm daemons cannot run here: {error}")


SLURM = ["--executor", "slurm", "--slurm-partition", PARTITION, "--slurm-gpus-per-job", "0"]


def status_lines(preset: Path, store: Path) -> list[str]:
    result = subprocess.run([sys.executable, "-m", "datadiet_nb.cli", "status", "--preset", str(preset), "--store",
                             str(store)], capture_output=True, text=True, timeout=120)
    return result.stdout.splitlines()


def test_a_slurm_sweep_equals_inline_and_status_shows_its_jobs(slurm, study, tmp_path):
    preset, reference = study
    store = tmp_path / "runs"
    submitted = subprocess.run(sweep(preset, store, *SLURM), capture_output=True, text=True, timeout=WAIT_LIMIT_S)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    assert "jobs submitted to Slurm" in submitted.stdout and "submitted 7 Slurm jobs" in submitted.stderr
    listed = status_lines(preset, store)
    assert any(" slurm " in line and line.split()[0] in ("missing", "running") for line in listed), listed
    followed = subprocess.run(sweep(preset, store, *SLURM, "--wait"), capture_output=True, text=True,
                              timeout=WAIT_LIMIT_S)
    assert followed.returncode == 0, followed.stderr[-3000:]
    assert not re.search(r"submitted \d+ Slurm jobs", followed.stderr), "a queued job was submitted again"
    assert_same_study(store, reference)
    assert sorted(key for _, key in starts(store)) == sorted(job_keys(preset).values())  # each job once
    assert status_lines(preset, store)[-1].endswith("7 done, 0 running, 0 failed, 0 missing")


def test_a_slurm_job_preempted_mid_run_is_requeued_and_resumes_from_its_checkpoint(slurm, study, tmp_path):
    preset, reference = study
    store, keys = tmp_path / "runs", job_keys(study[0])
    submitted = subprocess.run(sweep(preset, store, *SLURM), capture_output=True, text=True, timeout=WAIT_LIMIT_S)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    wait_for(lambda: mid_run(store, keys), "training run mid-way")
    preempted = mid_run(store, keys)
    from datadiet_nb.executors.slurm import submitted_jobs
    slurm_id = submitted_jobs(Store(store))[preempted]["slurm_id"]
    # what Slurm sends before preempting a job or at its time limit; submitit requeues the job
    subprocess.run(["scancel", "--signal=USR2", slurm_id], check=True, timeout=60)
    # Slurm holds a requeued job for 2 minutes before it may start again; the test lets it start at once
    wait_for(lambda: queue_state(slurm_id) == "PENDING", "requeued job")
    subprocess.run(["scontrol", "update", f"JobId={slurm_id}", "StartTime=now"], check=True, timeout=60)
    followed = subprocess.run(sweep(preset, store, *SLURM, "--wait"), capture_output=True, text=True,
                              timeout=WAIT_LIMIT_S)
    assert followed.returncode == 0, followed.stderr[-3000:]
    assert_same_study(store, reference)
    started = [key for _, key in starts(store)]
    assert started.count(preempted) == 2 and all(started.count(k) == 1 for k in keys.values() if k != preempted)
    [record] = [r for r in Store(store).records() if r["key"] == preempted]
    assert record["train"]["resumes"] and record["train"]["resumes"][0] > 0, "the requeued job resumed"


def queue_state(slurm_id: str) -> str:
    result = subprocess.run(["squeue", "-h", "-j", slurm_id, "-o", "%T"], capture_output=True, text=True, timeout=60)
    return result.stdout.strip()


def test_a_slurm_partition_that_does_not_exist_is_refused_in_one_line(slurm, study, tmp_path):
    store = tmp_path / "runs"
    result = subprocess.run(sweep(study[0], store, "--executor", "slurm", "--slurm-partition", "gpu-a100"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"datadiet-nb: error: Slurm has no partition 'gpu-a100'; it has ['{PARTITION}']"
    assert not store.exists()
