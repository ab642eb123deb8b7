"""The sweep's scheduler with several workers: never more jobs at once than workers, every job once, and each only
once the jobs it needs are done. The jobs here only mark themselves done in the store; what they compute is
tested with every executor elsewhere."""

import threading
import time

import numpy as np
import pytest

from datadiet_nb import presets
from datadiet_nb.experiment import load_dataset, scored_dataset
from datadiet_nb.store import Store
from datadiet_nb.sweep import _schedule, job_state, jobs

WORKERS = 3
JOB_S = 0.2  # long enough that the first jobs are all still running when the next are handed out


def mark_done(store: Store, job, num_scored: int) -> None:
    if job.kind == "scoring-run":
        path = store.checkpoint_path(f"{job.key}.scores.npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    elif job.kind == "scores":
        store.save_scores(job.key, {}, {"el2n": np.zeros(num_scored), "grand": np.zeros(num_scored)})
    else:
        store.save_run(job.key, {"key": job.key}, np.arange(3))


# (3 workers, 2 seeds), and (2 workers, 1 seed): a worker comes free while the scores are still missing, with
# nothing but runs that need them left to hand out
@pytest.mark.parametrize("workers, seeds", [(WORKERS, "0,1"), (2, "0")])
def test_jobs_run_at_most_workers_at_once_each_once_after_the_jobs_they_need(tmp_path, workers, seeds):
    preset = presets.with_overrides(presets.get("digits"), ["sparsities=0,0.5", f"seeds={seeds}",
                                                            "scoring.num_runs=3"])
    dataset = load_dataset(preset)
    store = Store(tmp_path / "runs")
    num_scored = scored_dataset(preset, dataset).num_train
    by_key = {job.key: job for job in jobs(preset, dataset)}
    lock, started, running, peak = threading.Lock(), [], [0], [0]

    def execute(job) -> bool:  # an assertion failing here is a failure the scheduler reports
        with lock:
            assert all(job_state(store, by_key[key], num_scored)[0] == "done" for key in job.needs), job.label
            started.append(job.key)
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(JOB_S * (3 if job.kind == "scoring-run" else 1))  # training runs finish while one still scores
        mark_done(store, job, num_scored)
        with lock:
            running[0] -= 1
        return True

    failures = _schedule(preset, dataset, store, execute, extra_done=lambda job: True, progress=False,
                         workers=workers)
    assert failures == {}
    assert sorted(started) == sorted(by_key)  # each once
    assert peak[0] == workers
    assert all(job_state(store, job, num_scored)[0] == "done" for job in by_key.values())


def test_runs_whose_scores_failed_unexpectedly_are_reported_not_waited_for(tmp_path):
    """A scores job that raises (not a failure recorded in the store) fails the runs that need it; the rest run."""
    preset = presets.with_overrides(presets.get("digits"), ["sparsities=0,0.5", "seeds=0", "scoring.num_runs=1"])
    dataset = load_dataset(preset)
    store = Store(tmp_path / "runs")
    num_scored = scored_dataset(preset, dataset).num_train

    def execute(job) -> bool:
        if job.kind == "scores":
            raise OSError("disk vanished")
        mark_done(store, job, num_scored)
        return True

    failures = _schedule(preset, dataset, store, execute, extra_done=lambda job: True, progress=False, workers=2)
    assert failures == {"scores": "OSError: disk vanished", "el2n-s0.5-seed0": "a job it needs failed",
                        "grand-s0.5-seed0": "a job it needs failed"}
    done = {job.label for job in jobs(preset, dataset) if job_state(store, job, num_scored)[0] == "done"}
    assert done == {"scoring-run-seed1000", "dense-s0-seed0", "random-s0.5-seed0"}


def test_a_need_that_fails_after_storing_its_output_does_not_fail_the_jobs_that_use_it(tmp_path):
    """A scores job (e.g. a notebook) that stores its scores and then fails in a later cell: the runs that prune
    by those scores still run, and only the scores job is reported failed."""
    preset = presets.with_overrides(presets.get("digits"), ["sparsities=0,0.5", "seeds=0", "scoring.num_runs=1"])
    dataset = load_dataset(preset)
    store = Store(tmp_path / "runs")
    num_scored = scored_dataset(preset, dataset).num_train

    def execute(job) -> bool:
        mark_done(store, job, num_scored)
        if job.kind == "scores":
            raise RuntimeError("a figure cell failed")
        return True

    failures = _schedule(preset, dataset, store, execute, extra_done=lambda job: True, progress=False, workers=2)
    assert failures == {"scores": "RuntimeError: a figure cell failed"}
    assert all(job_state(store, job, num_scored)[0] == "done" for job in jobs(preset, dataset))
