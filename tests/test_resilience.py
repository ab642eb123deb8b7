"""Faults a long study meets: kills, concurrent sweeps, corrupt files, divergence, full disks, bad preset files."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from datadiet_nb import claims, experiment, presets, store as store_module
from datadiet_nb.cli import main
from datadiet_nb.errors import UserError
from datadiet_nb.experiment import compute_scores, load_dataset, train_run
from datadiet_nb.results import load_results
from datadiet_nb.store import Store, write_json
from datadiet_nb.sweep import jobs, run_sweep, status
from helpers import assert_same_study, diverge_runs_of, study_toml

# 12 passes: long enough that two sweeps started together both find work (at 4, one could finish all first)
TINY_STUDY = study_toml(epochs=12)


@pytest.fixture
def tiny_file(tmp_path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_STUDY)
    return path


def sweep_command(preset: Path, store: Path) -> list[str]:
    return [sys.executable, "-m", "datadiet_nb.cli", "sweep", "--preset", str(preset), "--store", str(store),
            "--executor", "inline", "--quiet"]


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory) -> Path:
    """The tiny study swept once without interruption, in this process."""
    folder = tmp_path_factory.mktemp("reference")
    path = folder / "tiny.toml"
    path.write_text(TINY_STUDY)
    outcome = run_sweep(presets.get(str(path)), Store(folder / "runs"), progress=False)
    assert not outcome.failures and len(outcome.records) == 4
    return folder / "runs"


# --- kill -9 at random moments, then the same command again ----------------------------------

WAIT_LIMIT_S = 300  # no wait loop in these tests runs longer than this


def started_jobs(store: Path) -> int:
    events = store / "events.log"
    return sum(line.split()[3] == "start" for line in events.read_text().splitlines()) if events.exists() else 0


def kill_after_start(command: list[str], store: Path, job: int, delay: float) -> int:
    """Run ``command``; SIGKILL it ``delay`` seconds after it starts its ``job``-th job (1-based). Returns how many
    records the store held at the kill; fails if the process ended on its own first or the wait runs too long."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + WAIT_LIMIT_S
    try:
        while started_jobs(store) < job:
            assert process.poll() is None, f"the sweep ended before its job {job} started: {process.stderr.read()}"
            assert time.monotonic() < deadline, f"job {job} did not start within {WAIT_LIMIT_S} s"
            time.sleep(0.01)
        time.sleep(delay)
        assert process.poll() is None, "the sweep had finished: the kill would not have landed mid-work"
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=WAIT_LIMIT_S) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
    return len(list((store / "runs").glob("*.json")))


@pytest.mark.parametrize("kill_seed", [0, 1, 2])
def test_a_sweep_killed_at_a_random_moment_resumes_to_the_same_results(kill_seed, tiny_file, tmp_path,
                                                                       reference_store):
    """Killed a random moment into one of its first four jobs (the scores, or a training run): never after the
    last job has started, so the kill always lands mid-work; the same command again completes the study."""
    store = tmp_path / "runs"
    draw = random.Random(kill_seed)
    job, delay = draw.randint(1, 4), draw.uniform(0.0, 0.5)
    records_at_kill = kill_after_start(sweep_command(tiny_file, store), store, job, delay)
    assert records_at_kill < 4, "the kill landed after the work was done"
    resumed = subprocess.run(sweep_command(tiny_file, store), capture_output=True, text=True, timeout=WAIT_LIMIT_S)
    assert resumed.returncode == 0, (job, delay, resumed.stderr)
    assert_same_study(store, reference_store)


def test_a_run_killed_during_training_resumes_from_its_checkpoint(tiny_file, tmp_path, monkeypatch):
    """Deterministic companion of the random kills: die right after the 2nd checkpoint of a run."""
    preset = presets.get(str(tiny_file))
    ds = load_dataset(preset)
    store = Store(tmp_path / "runs")
    reference = train_run(preset, ds, "random", 0.5, 0, Store(tmp_path / "reference"))

    from datadiet_nb.train import TrainingState
    real_save, saves = TrainingState.save, []

    def save_then_die(self, path, step, result):
        real_save(self, path, step, result)
        saves.append(path)
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(TrainingState, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_run(preset, ds, "random", 0.5, 0, store)
    assert saves[-1].is_file() and not list((tmp_path / "runs" / "claims").glob("*.claim"))
    monkeypatch.setattr(TrainingState, "save", real_save)
    resumed = train_run(preset, ds, "random", 0.5, 0, store)
    assert resumed["predictions"] == reference["predictions"]
    assert resumed["train"]["epoch_losses"] == reference["train"]["epoch_losses"]
    assert not saves[-1].exists()  # deleted once the record is safe


def test_the_temporary_files_of_a_writer_killed_mid_write_are_removed_by_the_next_holder(tiny_digits, tmp_path):
    """A SIGKILL between writing a temporary file and renaming it leaves ``.<name>.<random>.tmp``; the process
    that takes the job over deletes those of its own key, and no other key's."""
    store = Store(tmp_path / "runs")
    ds = load_dataset(tiny_digits)
    key = experiment.config_key(experiment.run_config(tiny_digits, ds, "random", 0.5, 0))
    left = [store.checkpoint_path(f".{key}.pt.k1ll3d.tmp"), store.run_path(key).with_name(f".{key}.json.x8y9.tmp"),
            store.kept_path(key).with_name(f".{key}.kept.npy.a1b2.tmp")]
    other = store.checkpoint_path(".0123456789abcdef.pt.z9z9.tmp")
    for path in [*left, other]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a file")
    record = train_run(tiny_digits, ds, "random", 0.5, 0, store)
    assert record["key"] == key and not any(p.exists() for p in left) and other.exists()


# --- a scoring job resumed on purpose ----------------------------------------------------------

@pytest.fixture
def scoring_study(tiny_digits) -> presets.Preset:
    """Two scoring runs of 3 epochs (scores at epoch 3, EL2N also at 0 and 1), a checkpoint every epoch."""
    return presets.with_overrides(tiny_digits, ["recipe.epochs=3", "scoring.num_runs=2", "scoring.epoch=3",
                                                "scoring.trajectory=0,1", "checkpoint_epochs=1"])


def assert_same_scores(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert np.array_equal(got[name], expected[name]), name


def test_a_scoring_job_resumes_from_its_finished_runs(scoring_study, tmp_path, monkeypatch):
    ds = load_dataset(scoring_study)
    expected = compute_scores(scoring_study, ds, Store(tmp_path / "reference"))
    real_run, runs = experiment._scoring_run, []

    def run_then_die(preset, dataset, store, key, seed, *args, **kwargs):
        runs.append(seed)
        if len(runs) == 2:
            raise KeyboardInterrupt  # Ctrl-C as the second run starts: the first is finished and kept
        return real_run(preset, dataset, store, key, seed, *args, **kwargs)

    monkeypatch.setattr(experiment, "_scoring_run", run_then_die)
    store = Store(tmp_path / "runs")
    with pytest.raises(KeyboardInterrupt):
        compute_scores(scoring_study, ds, store)
    first, second = scoring_study.scoring.seeds
    assert runs == [first, second] and list((tmp_path / "runs" / "checkpoints").glob(f"*-seed{first}.scores.npz"))
    runs.clear()
    assert_same_scores(compute_scores(scoring_study, ds, store), expected)
    assert runs == [second]  # the finished run was read back, not trained again
    assert not list((tmp_path / "runs" / "checkpoints").glob("*"))


def test_a_scoring_run_resumes_from_its_mid_training_checkpoint(scoring_study, tmp_path, monkeypatch):
    from datadiet_nb.train import TrainingState

    ds = load_dataset(scoring_study)
    expected = compute_scores(scoring_study, ds, Store(tmp_path / "reference"))
    real_save, real_load, saves, resumed_at = TrainingState.save, TrainingState.load, [], []

    def save_then_die(self, path, step, result):
        real_save(self, path, step, result)
        saves.append(step)
        if len(saves) == 2:
            raise KeyboardInterrupt  # the first scoring run dies after its epoch-2 checkpoint

    def load(self, path):
        step, result = real_load(self, path)
        resumed_at.append(step)
        return step, result

    monkeypatch.setattr(TrainingState, "save", save_then_die)
    monkeypatch.setattr(TrainingState, "load", load)
    store = Store(tmp_path / "runs")
    with pytest.raises(KeyboardInterrupt):
        compute_scores(scoring_study, ds, store)
    monkeypatch.setattr(TrainingState, "save", real_save)
    assert_same_scores(compute_scores(scoring_study, ds, store), expected)
    assert resumed_at == [saves[1]] and saves[1] == 2 * saves[0] > 0  # resumed at epoch 2, not from scratch


# --- two sweeps on one store ----------------------------------------------------------------

def test_two_concurrent_sweeps_split_the_work_and_run_nothing_twice(tiny_file, tmp_path, reference_store):
    store = tmp_path / "runs"
    processes = [subprocess.Popen(sweep_command(tiny_file, store), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [err for _, err in outputs]
    events = [line.split() for line in (store / "events.log").read_text().splitlines()]
    started = [(e[4]) for e in events if e[3] == "start"]
    assert sorted(started) == sorted(job.key for job in jobs(presets.get(str(tiny_file)),
                                                             load_dataset(presets.get(str(tiny_file)))))
    assert len({e[2] for e in events if e[3] == "start"}) == 2, "both processes did some of the work"
    assert_same_study(store, reference_store)
    # both printed the same, complete table
    assert outputs[0][0].split("\n", 2)[2] == outputs[1][0].split("\n", 2)[2]


def test_only_one_of_many_threads_gets_a_claim(tmp_path):
    path, won = tmp_path / "job.claim", []
    barrier = threading.Barrier(8)

    def contender():
        barrier.wait()
        claim = claims.try_claim(path, timeout=60)
        if claim is not None:
            won.append(claim)

    threads = [threading.Thread(target=contender) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    won[0].release()
    assert not path.exists()


def test_stale_claims_expire_and_live_ones_are_respected(tmp_path):
    path = tmp_path / "job.claim"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "token": "x"}))
    claim = claims.try_claim(path, timeout=600)  # owner died on this host: stale at once
    assert claim is not None and claim.held()
    claim.release()
    path.write_text(json.dumps({"host": "another-machine", "pid": 1, "token": "y"}))
    assert claims.try_claim(path, timeout=600) is None  # fresh claim of another machine
    old = time.time() - 700
    os.utime(path, (old, old))
    claim = claims.try_claim(path, timeout=600)  # not refreshed for longer than the timeout
    assert claim is not None
    claim.release()


def test_a_held_claim_is_kept_fresh_by_its_heartbeat(tmp_path):
    path = tmp_path / "job.claim"
    claim = claims.try_claim(path, timeout=0.6)
    old = time.time() - 100
    os.utime(path, (old, old))
    time.sleep(0.4)  # > timeout / HEARTBEATS_PER_TIMEOUT
    assert claims.read_claim(path)["age"] < 0.6 and claim.held()
    claim.release()


# --- corruption -----------------------------------------------------------------------------

def corrupt_scores(path: Path, how: str) -> None:
    sidecar = path.with_suffix(".json")
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:100])
        return
    arrays = store_module.read_arrays(path)
    if how == "nan":
        arrays["el2n"][3] = np.nan
    elif how == "wrong length":
        arrays = {k: v[..., :-1] for k, v in arrays.items()}
    elif how == "missing array":
        arrays.pop("grand")
    data = store_module.npz_bytes(**arrays)  # a consistent checksum: only the content checks can tell
    path.write_bytes(data)
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "sha256": store_module.sha256(data)}))


@pytest.mark.parametrize("how", ["truncated", "nan", "wrong length", "missing array"])
def test_a_corrupt_scores_file_is_reported_moved_aside_and_recomputed(how, tiny_digits, tmp_path, caplog):
    store = Store(tmp_path / "runs")
    ds = load_dataset(tiny_digits)
    first = compute_scores(tiny_digits, ds, store)
    [path] = (tmp_path / "runs" / "scores").glob("*.npz")
    corrupt_scores(path, how)
    again = compute_scores(tiny_digits, ds, store)
    assert np.array_equal(again["el2n"], first["el2n"]) and np.array_equal(again["grand"], first["grand"])
    assert str(path) in caplog.text and {"truncated": "checksum", "nan": "NaN", "wrong length": "scores for",
                                    "missing array": "no grand array"}[how] \
        in caplog.text
    assert sorted(p.name.split("-", 2)[2] for p in (tmp_path / "runs" / "corrupt").iterdir()) == \
        sorted([path.name, path.with_suffix(".json").name])


@pytest.mark.parametrize("edit", ["accuracy", "truncate", "kept", "kept missing"])
def test_a_hand_edited_record_is_never_used(edit, tiny_digits, tmp_path, caplog, monkeypatch):
    store = Store(tmp_path / "runs")
    ds = load_dataset(tiny_digits)
    record = train_run(tiny_digits, ds, "random", 0.5, 0, store)
    path = store.run_path(record["key"])
    if edit == "accuracy":
        path.write_text(path.read_text().replace(f'"overall_accuracy": {record["overall_accuracy"]}',
                                                 '"overall_accuracy": 0.999'))
    elif edit == "truncate":
        path.write_text(path.read_text()[:-50])
    elif edit == "kept":
        store_module.write_npy(store.kept_path(record["key"]), np.arange(10))
    else:
        store.kept_path(record["key"]).unlink()
    assert load_results(store).empty  # not counted...
    assert str(path) in caplog.text
    if edit == "kept missing":
        assert f"kept-index file {store.kept_path(record['key']).name} is missing" in caplog.text
    redone = train_run(tiny_digits, ds, "random", 0.5, 0, store)  # ...and redone
    assert redone["predictions"] == record["predictions"] and redone["key"] == record["key"]


# --- divergence -----------------------------------------------------------------------------

def test_a_diverged_run_is_recorded_as_failed_and_the_sweep_goes_on(tiny_digits, tmp_path, monkeypatch, capsys):
    study = tmp_path / "study.json"
    study.write_text(json.dumps({"base": "digits", "sparsities": [0.0, 0.5], "seeds": [0], "recipe": {"epochs": 2},
                                 "scoring": {"num_runs": 1, "epoch": 1}}))
    diverge_runs_of("grand", monkeypatch.setattr)
    argv = ["sweep", "--preset", str(study), "--store", str(tmp_path / "runs"), "--executor", "inline", "--quiet"]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert "1 jobs failed" in err and "grand-s0.5-seed0" in err and "training loss became nan" in err
    assert "el2n" in out and "random" in out  # the others finished and are tabulated
    [failure] = (tmp_path / "runs" / "failed").glob("*.json")
    assert "training loss became" in json.loads(failure.read_text())["message"]
    assert main(["status", *argv[1:5]]) == 1
    assert "failed   grand-s0.5-seed0" in capsys.readouterr().out
    # a rerun reports the failure again without retraining it; --retry-failed tries it again
    monkeypatch.setattr(experiment, "train", lambda *a, **k: pytest.fail("a recorded failure was retried"))
    assert main(argv) == 1
    monkeypatch.undo()
    assert main([*argv, "--retry-failed"]) == 0
    assert len(load_results(tmp_path / "runs")["key"].unique()) == 4


# --- full disk, unwritable folders, bad preset files -----------------------------------------

def test_a_full_disk_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "record.json"
    write_json(path, {"accuracy": 0.9})

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store_module.os, "fsync", full)
    with pytest.raises(UserError) as error:
        write_json(path, {"accuracy": 0.1, "padding": "x" * 10_000})
    assert str(error.value) == f"cannot write {path}: No space left on device (the previous file is unchanged)"
    assert json.loads(path.read_text()) == {"accuracy": 0.9}
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]  # no temporary file left behind


def test_a_full_disk_during_a_command_is_one_line_and_keeps_the_old_output(tmp_path, monkeypatch, capsys):
    out = tmp_path / "kept.npy"
    np.save(out, np.arange(5))
    before = out.read_bytes()
    real_replace = store_module.os.replace

    def full(src, dst):
        if str(dst) == str(out):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)

    monkeypatch.setattr(store_module.os, "replace", full)
    assert main(["prune", "--sparsity", "0.5", "--score", "random", "--out", str(out), "--force", "--quiet",
                 "--store", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"datadiet-nb: error: cannot write {out}: No space left on device (the previous file is unchanged)"]
    assert out.read_bytes() == before


def test_an_unwritable_store_fails_before_any_work(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(experiment, "train", lambda *a, **k: pytest.fail("trained into an unwritable store"))
    assert main(["sweep", "--store", str(blocker / "runs"), "--executor", "inline", "--quiet"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"datadiet-nb: error: cannot write {blocker / 'runs'}")


@pytest.mark.parametrize("content, message", [
    ('base = "digits"\n[recipe]\nepoch = 3\n', "unknown preset key 'recipe.epoch'"),
    ('base = "digits"\nseeds = "0,1"\n', "seeds must be tuple, got str"),
    ('base = "digits"\n[recipe]\nlr = "fast"\n', "recipe.lr must be float, got str 'fast'"),
    ('dataset = "digits"\nmodel = "smallcnn"\nwidht = 3\n', "unknown preset key 'widht'"),
    ('model = "smallcnn"\n', "needs 'dataset' and 'model'"),
    ('base = "digits"\nsparsities = [0.5, 1.5]\n', "sparsity must be in [0, 1)"),
    ('base = "digits"\n[recipe\n', "not valid TOML"),
])
def test_a_bad_preset_file_names_the_key(content, message, tmp_path, capsys):
    path = tmp_path / "study.toml"
    path.write_text(content)
    assert main(["status", "--preset", str(path), "--store", str(tmp_path / "runs")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert message in line


def test_status_lists_done_running_failed_and_missing(tiny_file, tmp_path, capsys):
    preset = presets.get(str(tiny_file))
    store = Store(tmp_path / "runs")
    ds = load_dataset(preset)
    train_run(preset, ds, "dense", 0.0, 0, store)
    states = {job.label: state for job, state, _ in status(preset, store)}
    assert states == {"scoring-run-seed1000": "missing", "scoring-run-seed1001": "missing", "scores": "missing",
                      "dense-s0-seed0": "done", "el2n-s0.5-seed0": "missing", "grand-s0.5-seed0": "missing",
                      "random-s0.5-seed0": "missing"}
    random_job = next(job for job in jobs(preset, ds) if job.label == "random-s0.5-seed0")
    claim = store.try_claim(random_job.key)
    assert main(["status", "--preset", str(tiny_file), "--store", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "running  random-s0.5-seed0" in out and f"pid {os.getpid()}" in out
    assert out.strip().splitlines()[-1].endswith("1 done, 1 running, 0 failed, 5 missing")
    claim.release()


def test_a_sweep_takes_over_the_claims_of_a_dead_process(tiny_file, tmp_path):
    preset = presets.get(str(tiny_file))
    store = Store(tmp_path / "runs")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for job in jobs(preset, load_dataset(preset)):
        store.claim_path(job.key).parent.mkdir(parents=True, exist_ok=True)
        store.claim_path(job.key).write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid}))
    assert {state for _, state, _ in status(preset, store)} == {"missing"}
    outcome = run_sweep(preset, store, progress=False)
    assert len(outcome.records) == 4 and not outcome.failures
