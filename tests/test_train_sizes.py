"""The training-set size as a grid axis of the sweep: jobs, keys, resume, executors, --dry-run and status."""

from __future__ import annotations

import numpy as np
import pytest

from datadiet_nb import presets, train as train_module
from datadiet_nb.cli import main
from datadiet_nb.errors import UserError
from datadiet_nb.experiment import load_dataset, run_config
from datadiet_nb.results import load_results
from datadiet_nb.store import Store, config_key
from datadiet_nb.sweep import jobs, run_remote_job, run_sweep

SIZES = (8, 24)
TINY_REGIME = ["recipe.epochs=2", "scoring.num_runs=1", "scoring.epoch=1", "scoring.trajectory=", "seeds=0",
               f"train_sizes={','.join(map(str, SIZES))}", "scores=el2n,el2n-easy"]


@pytest.fixture
def regime() -> presets.Preset:
    return presets.with_overrides(presets.get("digits-regime"), TINY_REGIME)


def test_each_size_is_a_grid_of_its_own_that_shares_the_scores(regime):
    dataset = load_dataset(regime)
    planned = jobs(regime, dataset)
    runs = [job for job in planned if job.kind == "run"]
    assert [job.kind for job in planned[:2]] == ["scoring-run", "scores"]  # once, for every size
    assert len(planned) == 2 + len(runs) and len(runs) == len(SIZES) * 3  # dense, el2n, el2n-easy per size
    assert len({job.key for job in planned}) == len(planned)  # keys differ by size
    assert [job.size for job in runs] == [8, 8, 8, 24, 24, 24]
    assert {job.label for job in runs} >= {"n8-dense-s0-seed0", "n24-el2n-easy-s0.5-seed0"}
    for job in runs:  # a sized run is the run of the preset at that size: the same key, so the same record
        at_size = presets.with_overrides(regime, ["train_sizes=", f"train_per_class={job.size}"])
        sized = load_dataset(at_size)
        assert sized.num_train == job.size * dataset.num_classes
        assert job.key == config_key(run_config(at_size, sized, job.spec.score, job.spec.sparsity, job.spec.seed))
        if job.spec.score != "dense":
            assert job.needs == (planned[1].key,)


def test_a_sweep_of_sizes_trains_each_on_its_subset_and_a_rerun_trains_nothing(regime, tmp_path, monkeypatch):
    store = Store(tmp_path / "runs")
    outcome = run_sweep(regime, store, progress=False)
    assert not outcome.failures and len(outcome.records) == 6
    full = load_dataset(regime)
    for record in outcome.records:
        size = record["dataset"]["num_train"] // full.num_classes
        assert size in SIZES and record["full_preset"]["train_per_class"] == size
        kept = np.load(store.kept_path(record["key"]))
        subset = full.with_train_per_class(size)
        assert record["num_kept"] == len(kept) == (size * 10 if record["score"] == "dense" else size * 5)
        assert np.bincount(subset.train_labels.numpy(), minlength=10).tolist() == [size] * 10
        assert kept.max() < len(subset.train_labels)  # indices into the size's subset, not the full set
        assert record["keep_ratio"] == pytest.approx(
            (np.bincount(subset.train_labels.numpy()[kept], minlength=10) / size).tolist())
    results = load_results(store)
    assert sorted(results["train_size"].unique()) == list(SIZES)

    def no_training(*args, **kwargs):
        raise AssertionError("a resumed sweep trained again")

    monkeypatch.setattr(train_module, "train", no_training)
    monkeypatch.setattr("datadiet_nb.experiment.train", no_training)
    again = run_sweep(regime, store, progress=False)
    assert [r["key"] for r in again.records] == [r["key"] for r in outcome.records]


def test_a_remote_worker_runs_a_sized_job_on_its_subset(regime, tmp_path):
    """What Ray tasks and Slurm array jobs run (run_remote_job): the job's size, not the full training set."""
    store = Store(tmp_path / "runs")
    dense = next(job for job in jobs(regime, load_dataset(regime)) if job.kind == "run" and job.size == 8)
    assert run_remote_job(regime, str(store.root), None, dense) == (dense.key, None)
    assert store.load_run(dense.key)["num_kept"] == 8 * 10


def test_dry_run_and_status_list_every_size(regime, tmp_path, capsys):
    store = str(tmp_path / "runs")
    sets = [arg for assignment in TINY_REGIME for arg in ("--set", assignment)]
    assert main(["sweep", "--preset", "digits-regime", "--store", store, "--dry-run", *sets]) == 0
    listed = capsys.readouterr().out
    for size in SIZES:
        assert f"missing  n{size}-el2n-easy-s0.5-seed0" in listed and f"n{size}-dense-s0-seed0" in listed
    assert "8 jobs to run" in listed
    assert main(["sweep", "--preset", "digits-regime", "--store", store, "--executor", "inline", "--quiet", *sets]) == 0
    printed = capsys.readouterr().out
    assert "training set: 8 examples per class" in printed and "training set: 24 examples per class" in printed
    assert main(["status", "--preset", "digits-regime", "--store", store, "--verbose", *sets]) == 0
    states = capsys.readouterr().out
    assert "done     n24-el2n-s0.5-seed0" in states and "8 done, 0 running, 0 failed, 0 missing" in states


@pytest.mark.parametrize("assignments, message", [
    (["train_per_class=10"], "set train_per_class or train_sizes, not both"),
    (["train_sizes=10,10"], "train_sizes must be distinct sizes >= 1"),
    (["train_sizes=0,10"], "train_sizes must be distinct sizes >= 1"),
    (["scoring.full_train=false"], "train_sizes needs scoring.full_train=true"),
])
def test_size_grids_that_cannot_work_are_refused(assignments, message):
    with pytest.raises(UserError, match=message):
        presets.with_overrides(presets.get("digits-regime"), assignments)


def test_a_size_larger_than_the_smallest_class_is_refused_in_one_line(tmp_path, capsys):
    """digits' smallest training class has 84 images (class 8): 143 per class would silently train on fewer of
    that class."""
    store = str(tmp_path / "runs")
    argv = ["sweep", "--preset", "digits-regime", "--store", store, "--executor", "inline", "--quiet"]
    assert main([*argv, "--set", "train_sizes=12,143"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "143 training images per class is more than" in err[0] and "choose at most" in err[0]
    assert not any((tmp_path / "runs").rglob("*.json"))  # nothing trained or stored
    with pytest.raises(UserError, match="choose at most"):
        load_dataset(presets.with_overrides(presets.get("digits"), ["train_per_class=1000"]))


def test_train_sizes_set_on_a_preset_without_them_are_whole_numbers():
    preset = presets.with_overrides(presets.get("digits"), ["train_sizes=5,10", "scoring.full_train=true"])
    assert preset.train_sizes == (5, 10) and preset.at_size(5).train_per_class == 5
    assert preset.at_size(5).train_sizes == ()


def test_the_notebook_executor_runs_each_size_in_its_own_notebook_with_the_inline_records(regime, tmp_path):
    from datadiet_nb.executors.notebooks import run_sweep_notebooks

    overrides = TINY_REGIME
    study = presets.with_overrides(presets.get("digits-regime"), overrides)
    book_runs = tmp_path / "book"
    outcome = run_sweep_notebooks(study, overrides, Store(tmp_path / "nb"), book_runs, progress=False, workers=2)
    inline = run_sweep(study, Store(tmp_path / "inline"), progress=False)
    assert not outcome.failures and len(outcome.records) == 6
    assert [r["key"] for r in outcome.records] == [r["key"] for r in inline.records]
    assert [r["num_kept"] for r in outcome.records] == [r["num_kept"] for r in inline.records] == [80, 40, 40, 240,
                                                                                                   120, 120]
    names = {p.name for p in (book_runs / "digits-regime" / "train").glob("*.ipynb")}
    assert names == {f"n{n}-{run}-seed0.ipynb" for n in SIZES for run in ("dense-s0", "el2n-s0.5", "el2n-easy-s0.5")}
    assert (book_runs / "digits-regime" / "regime.ipynb").is_file()  # its default chapters
