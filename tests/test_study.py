"""Scoring, pruning and training runs through the store: caching, keys, records, results table."""

import numpy as np
import pandas as pd
import pytest

from datadiet_nb import experiment, presets
from datadiet_nb.experiment import compute_scores, load_dataset, train_run
from datadiet_nb.prune import num_kept
from datadiet_nb.errors import UserError
from datadiet_nb.results import format_table, keep_ratio_table, load_results, summarize
from datadiet_nb.store import Store
from datadiet_nb.sweep import plan, run_sweep
from helpers import hand_summary, records_in


def test_scores_are_cached_and_a_changed_config_makes_a_new_key(tiny_digits, tmp_path, monkeypatch):
    store = Store(tmp_path / "runs")
    ds = load_dataset(tiny_digits)
    first = compute_scores(tiny_digits, ds, store)
    assert first["el2n"].shape == (ds.num_train,) and first["grand_runs"].shape == (1, ds.num_train)
    assert np.all(first["el2n"] >= 0) and np.all(first["el2n"] <= np.sqrt(2))
    calls = []
    monkeypatch.setattr(experiment, "train", lambda *a, **k: calls.append(1))
    again = compute_scores(tiny_digits, ds, store)
    assert calls == [] and np.array_equal(again["grand"], first["grand"])
    changed = presets.with_overrides(tiny_digits, ["scoring.epoch=0", "scoring.trajectory="])  # t=0: no training
    at_init = compute_scores(changed, ds, store)
    assert calls == [] and not np.array_equal(at_init["el2n"], first["el2n"])
    assert len(list((tmp_path / "runs" / "scores").glob("*.npz"))) == 2


def test_scores_average_over_runs(tiny_digits, tmp_path):
    preset = presets.with_overrides(tiny_digits, ["scoring.num_runs=2"])
    scores = compute_scores(preset, load_dataset(preset), Store(tmp_path))
    np.testing.assert_allclose(scores["el2n"], scores["el2n_runs"].mean(0))
    assert not np.array_equal(scores["el2n_runs"][0], scores["el2n_runs"][1])


def test_a_training_run_writes_a_complete_record_and_is_not_redone(tiny_digits, tmp_path, monkeypatch):
    store = Store(tmp_path)
    ds = load_dataset(tiny_digits)
    record = train_run(tiny_digits, ds, "el2n", 0.5, 0, store)
    kept = store.load_kept(record["key"])
    assert len(kept) == record["num_kept"] == num_kept(ds.num_train, 0.5) == 449  # 448.5 rounds half up
    assert len(record["predictions"]) == len(ds.test_labels) and len(record["class_accuracy"]) == 10
    for field in ("recipe", "scoring_seeds", "scores_key", "provenance", "full_preset", "train", "seconds"):
        assert field in record or field == "scoring_seeds"
    assert record["provenance"]["torch"] and "git_commit" in record["provenance"]
    np.testing.assert_allclose(np.mean(np.array(record["predictions"]) == ds.test_labels.numpy()),
                               record["overall_accuracy"])
    monkeypatch.setattr(experiment, "train", lambda *a, **k: pytest.fail("a stored run was retrained"))
    assert train_run(tiny_digits, ds, "el2n", 0.5, 0, store) == record


def test_plan_shares_the_dense_run_across_scores(tiny_digits):
    preset = presets.with_overrides(tiny_digits, ["seeds=0,1"])
    specs = plan(preset)
    assert [s.score for s in specs].count("dense") == 2
    assert len(specs) == 2 + 3 * 2


def test_sweep_results_table(tiny_digits, tmp_path):
    """Over two seeds, every number of the summary and keep-ratio tables equals a hand computation from the records."""
    study = presets.with_overrides(tiny_digits, ["seeds=0,1", "sparsities=0,0.5,0.8"])
    store = Store(tmp_path)
    outcome = run_sweep(study, store, progress=False)
    assert len(outcome.records) == 2 * 7 and not outcome.failures
    df = load_results(store)
    assert len(df) == 14 * 10
    for column in ("preset", "dataset", "model", "score", "sparsity", "offset", "seed", "class",
                   "class_accuracy", "keep_ratio", "overall_accuracy"):
        assert column in df.columns
    expected = hand_summary(records_in(tmp_path))
    summary = summarize(df, samples=50)
    assert len(summary) == len(expected) == 7
    assert summary["std_below_dense_p"].notna().sum() == 6  # every pruned point has its paired test
    for _, row in summary.iterrows():
        hand = expected[(row["score"], row["sparsity"])]
        for name in ("overall_accuracy", "class_std", "worst_class_accuracy"):
            np.testing.assert_allclose(row[name], hand[name], rtol=1e-12, equal_nan=True, err_msg=name)
            assert row[f"{name}_lo"] <= row[name] <= row[f"{name}_hi"], name
        if row["score"] != "dense":  # the seeds and the test set counted: no further from p = 1/2 (t = 0) than
            # the seeds alone
            p, alone = row["std_below_dense_p"], hand["std_below_dense_p_seeds_alone"]
            assert abs(p - 0.5) <= abs(alone - 0.5) + 1e-12
            assert row["std_below_dense_p"] <= row["std_below_dense_p_adjusted"] <= 1
        assert (row["worst_class"], row["num_seeds"]) == (hand["worst_class"], hand["num_seeds"]) == \
            (row["worst_class"], 2)
    ratios = keep_ratio_table(df)
    assert list(ratios.columns) == [str(c) for c in range(10)]
    assert list(ratios.index) == sorted(expected, key=lambda point: (point[1], point[0]))  # by sparsity, then score
    for (score, sparsity), hand in expected.items():
        np.testing.assert_allclose(ratios.loc[(score, sparsity)].to_numpy(), hand["keep_ratio"], rtol=1e-12)
    assert not np.allclose(*(r["keep_ratio"] for r in records_in(tmp_path) if (r["score"], r["sparsity"]) ==
                             ("random", 0.5)))  # the two seeds differ there, so the mean is tested
    # every column of every row is the record's, whichever way the store is named or the runs are chosen
    assert list(df.columns) == ["preset", "dataset", "model", "train_size", "score", "sparsity", "offset", "seed", "class",
                                "class_index", "class_accuracy", "keep_ratio", "overall_accuracy", "class_std",
                                "key", "correct"]
    by_key = df.set_index(["key", "class_index"])
    for r in records_in(tmp_path):
        labels, predictions = np.array(r["test_labels"]), np.array(r["predictions"])
        for c, name in enumerate(r["classes"]):
            row = by_key.loc[(r["key"], c)]
            assert (row["preset"], row["dataset"], row["model"], row["score"], row["sparsity"], row["offset"],
                    row["seed"], row["class"]) == (r["preset"], r["dataset"]["name"], r["model"], r["score"],
                                                   r["sparsity"], r["offset"], r["seed"], name)
            assert (row["class_accuracy"], row["keep_ratio"], row["overall_accuracy"], row["class_std"]) == (
                r["class_accuracy"][c], r["keep_ratio"][c], r["overall_accuracy"], r["bias"]["std"])
            np.testing.assert_array_equal(row["correct"], predictions[labels == c] == c)
    pd.testing.assert_frame_equal(load_results(str(tmp_path)), df)
    chosen = [r["key"] for r in records_in(tmp_path)[:3]]
    assert list(load_results(store, keys=chosen + chosen[:1])["key"].unique()) == chosen  # once each, in order
    lines = format_table(ratios.head(2).assign(extra=np.nan)).splitlines()
    assert lines[2].split()[2:] == ["1.000"] * 10 + ["-"]  # three decimals; a missing value is a dash
    assert lines[3].split()[2:] == [f"{v:.3f}" for v in ratios.iloc[1]] + ["-"]


def test_records_without_test_labels_load_but_cannot_be_bootstrapped(tiny_digits, tmp_path):
    """Records written before per-example results were kept: the table loads, the intervals say why they can't."""
    store = Store(tmp_path)
    record = train_run(tiny_digits, load_dataset(tiny_digits), "random", 0.5, 0, store)
    old = {k: v for k, v in record.items() if k not in ("test_labels", "checksum", "kept_sha256")}
    store.save_run(record["key"], old, store.load_kept(record["key"]))
    df = load_results(store)
    assert len(df) == 10 and df["correct"].isna().all() and (df["class_accuracy"] == record["class_accuracy"]).all()
    with pytest.raises(UserError, match=r"^some run records predate per-example test results \(datadiet-nb < 0\.2\); "
                                        r"run the sweep again to record them$"):
        summarize(df)


def test_every_ingredient_of_a_run_changes_its_key(tiny_digits, monkeypatch):
    """Dataset size, model, recipe, scoring, score, sparsity, offset, seed and code version all enter the key."""
    from datadiet_nb import experiment as exp
    from datadiet_nb.store import config_key

    ds = load_dataset(tiny_digits)

    def key(preset=tiny_digits, dataset=ds, score="el2n", sparsity=0.5, seed=0):
        return config_key(exp.run_config(preset, dataset, score, sparsity, seed))

    variants = {
        "base": key(),
        "dataset size": key(dataset=ds.with_train_per_class(50)),
        "model": key(presets.with_overrides(tiny_digits, ["model_options.width=8"])),
        "recipe": key(presets.with_overrides(tiny_digits, ["recipe.lr=0.02"])),
        "scoring": key(presets.with_overrides(tiny_digits, ["scoring.epoch=2"])),
        "score": key(score="grand"),
        "sparsity": key(sparsity=0.3),
        "offset": key(presets.with_overrides(tiny_digits, ["offset=0.1"])),
        "seed": key(seed=1),
    }
    monkeypatch.setattr(exp, "CODE_VERSION", "changed")
    variants["code version"] = key()
    assert len(set(variants.values())) == len(variants)
    # what does not change a result does not change the key: checkpoint interval, device choice, preset name
    monkeypatch.undo()
    for edit in (["checkpoint_epochs=3"], ["device=cpu"]):
        assert key(presets.with_overrides(tiny_digits, edit)) == variants["base"]
