"""scoring.per_seed: each training seed is pruned by the mean of K scoring runs of its own, so the scoring runs'
variability reaches the intervals over seeds; shared scoring (the paper's) keeps its store keys."""

from __future__ import annotations

import numpy as np

import pytest

from datadiet_nb import presets
from datadiet_nb.errors import UserError
from datadiet_nb.experiment import compute_scores, kept_indices, load_dataset, scores_config
from datadiet_nb.prune import select_indices
from datadiet_nb.store import Store, config_key
from datadiet_nb.sweep import jobs, run_sweep

TINY = ["recipe.epochs=1", "scoring.num_runs=2", "scoring.epoch=1", "scoring.trajectory=", "seeds=0,1",
        "sparsities=0,0.5", "scores=el2n"]


def test_each_training_seed_prunes_by_the_mean_of_its_own_scoring_runs(tmp_path):
    study = presets.with_overrides(presets.get("digits"), TINY)
    assert study.scoring.per_seed  # on by default for the embedded preset
    assert study.scoring_seeds() == [1000, 1001, 1100, 1101]
    assert study.scoring_seeds_of(1) == [1100, 1101]
    dataset = load_dataset(study)
    planned = jobs(study, dataset)
    assert [job.label for job in planned if job.kind == "scoring-run"] == [
        "scoring-run-seed1000", "scoring-run-seed1001", "scoring-run-seed1100", "scoring-run-seed1101"]
    store = Store(tmp_path / "runs")
    outcome = run_sweep(study, store, progress=False)
    scores = compute_scores(study, dataset, store)
    runs = scores["el2n_runs"]
    assert runs.shape == (4, dataset.num_train)
    np.testing.assert_allclose(scores["el2n_seed0"], runs[:2].mean(0))
    np.testing.assert_allclose(scores["el2n_seed1"], runs[2:].mean(0))
    assert not np.array_equal(select_indices(scores["el2n_seed0"], 0.5), select_indices(scores["el2n_seed1"], 0.5))
    for record in outcome.records:
        if record["score"] == "el2n":
            own = scores[f"el2n_seed{record['seed']}"]
            np.testing.assert_array_equal(store.load_kept(record["key"]), select_indices(own, 0.5))
    with pytest.raises(UserError, match="seed 7 is not one of digits's seeds \\[0, 1\\]: with scoring.per_seed"):
        kept_indices(study, dataset, "el2n", 0.5, 7, store)


def test_shared_scoring_keeps_its_keys_and_one_set_of_runs():
    shared = presets.with_overrides(presets.get("digits"), [*TINY, "scoring.per_seed=false"])
    assert shared.scoring_seeds() == shared.scoring_seeds_of(1) == [1000, 1001]
    config = scores_config(shared, load_dataset(shared))
    assert "per_seed" not in config["scoring"]  # the config (and so the key) of shared scores as before
    per_seed = presets.with_overrides(presets.get("digits"), TINY)
    assert config_key(scores_config(per_seed, load_dataset(per_seed))) != config_key(config)
