"""The Findings page's claims on hand-made records: the tests, the page's Holm adjustment and the verdicts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from datadiet_nb import findings
from datadiet_nb.stats import holm

N_TEST = 400  # test images per class: large enough that the seeds dominate the error
DENSE_ACC = [0.95, 0.9, 0.85, 0.8, 0.75, 0.7]  # class 5 is the hardest
KEEP_FOLLOWS_ERROR = [0.3, 0.4, 0.5, 0.55, 0.6, 0.65]  # the harder the class, the more of it kept


def records(preset: str, runs: dict[tuple[str, float, int], list[float]], keep: list[float],
            train_size: float = 100.0) -> list[dict]:
    rows = []
    for (rule, sparsity, seed), accuracies in runs.items():
        for index, accuracy in enumerate(accuracies):
            rows.append({"preset": preset, "train_size": train_size, "score": rule, "sparsity": sparsity,
                         "seed": seed, "key": f"{preset}-{rule}-{sparsity}-{seed}-{train_size}",
                         "class": f"c{index}", "class_index": index, "class_accuracy": accuracy,
                         "keep_ratio": 1.0 if rule == "dense" else keep[index],
                         "overall_accuracy": float(np.mean(accuracies)),
                         "correct": np.arange(N_TEST) < round(accuracy * N_TEST)})
    return rows


def study(preset: str, el2n_shift: float, seeds: int = 4, keep=KEEP_FOLLOWS_ERROR,
          std_factor: float = 1.0) -> list[dict]:
    """Dense runs, and EL2N at 10 % and 50 % sparsity whose class accuracies are dense's shifted by
    ``el2n_shift`` and pulled towards their mean by ``std_factor`` (a little seed noise on both)."""
    runs = {}
    for seed in range(seeds):
        jitter = 0.01 * ((seed % 3) - 1)
        dense = np.array(DENSE_ACC) + jitter
        runs[("dense", 0.0, seed)] = list(dense)
        for sparsity in (0.1, 0.5):
            pruned = dense.mean() + std_factor * (dense - dense.mean()) + el2n_shift + 0.005 * (seed % 2)
            runs[("el2n", sparsity, seed)] = list(np.clip(pruned, 0, 1))
    return records(preset, runs, keep)


def test_each_claim_is_tested_and_adjusted_over_the_page():
    results = pd.DataFrame(study("a", el2n_shift=0.0, std_factor=0.5) + study("b", el2n_shift=-0.1))
    table = findings.findings_table(results).set_index(["preset", "claim"])
    keep = table.loc[("a", findings.CLAIMS["keep"][0])]
    rho, p = scipy_stats.spearmanr(KEEP_FOLLOWS_ERROR, 1 - np.array(DENSE_ACC), alternative="greater")
    assert rho == 1.0 and keep["p"] == pytest.approx(p) and keep["result"].startswith("rho = 1.00 over 6 classes")
    assert "kept most: c5 (0.65), c4 (0.60); hardest for dense: c5, c4" in keep["result"]
    # the page's family: 2 presets x (keep + accuracy + spread at 10 % and 50 %) = 8 tests
    every_p = [row["p"] for row in findings.preset_findings(results[results["preset"] == "a"], "a")
               + findings.preset_findings(results[results["preset"] == "b"], "b")]
    assert len(every_p) == 8
    adjusted = dict(zip(range(8), holm(every_p)))
    assert keep["p_adjusted"] == pytest.approx(adjusted[0])
    assert keep["verdict"] == "holds (adjusted test)"
    same = table.loc[("a", findings.CLAIMS["accuracy"][0])]
    assert same["verdict"].startswith("holds: the whole interval is above -2 points")
    lower = table.loc[("b", findings.CLAIMS["accuracy"][0])]
    points = float(lower["result"].split(" points")[0])
    assert points == pytest.approx(-9.75, abs=0.1) and "points at 50 % sparsity" in lower["result"]  # -10 + 0.25
    assert lower["verdict"].startswith("does not hold: accuracy is below dense")
    narrower = table.loc[("a", findings.CLAIMS["spread"][0])]
    assert narrower["verdict"] == "holds (adjusted test)" and narrower["result"].startswith("-")
    same_spread = table.loc[("b", findings.CLAIMS["spread"][0])]
    assert same_spread["verdict"].startswith("not shown")


def test_a_preset_that_cannot_test_a_claim_says_why():
    one_seed = pd.DataFrame(study("solo", el2n_shift=0.0, seeds=1))
    table = findings.findings_table(one_seed).set_index("claim")
    assert table.loc[findings.CLAIMS["accuracy"][0], "verdict"] == "cannot be tested here: fewer than two seeds"
    assert np.isnan(table.loc[findings.CLAIMS["spread"][0], "p_adjusted"])
    flat = pd.DataFrame(study("flat", el2n_shift=0.0, keep=[0.5] * 6))
    verdict = findings.findings_table(flat).set_index("claim").loc[findings.CLAIMS["keep"][0], "verdict"]
    assert verdict == "cannot be tested here: the keep ratios or the dense errors are the same for every class"
    no_dense = pd.DataFrame([row for row in study("nodense", 0.0) if row["score"] != "dense"])
    assert set(findings.findings_table(no_dense)["verdict"]) == {"cannot be tested here: no dense runs"}


def test_a_preset_with_sizes_is_read_at_its_largest():
    small = records("r", {("dense", 0.0, s): [0.5] * 6 for s in range(3)}, KEEP_FOLLOWS_ERROR, train_size=10.0)
    results = pd.DataFrame(small + [dict(row, preset="r", train_size=84.0) for row in study("r", 0.0)])
    table = findings.findings_table(results)
    assert set(table["preset"]) == {"r (84 per class, the largest size)"}
    shown = findings.findings_display(table)
    assert list(shown.data.columns) == ["paper", "result", "p", "p (Holm)", "verdict"]
    assert table["result"].iloc[0] in shown.to_html()  # whole, not cut short


def test_studies_are_read_back_from_the_store_with_the_runs_they_share(tmp_path):
    """Three tiny sweeps on one store, as make report runs them: the regime grid is put back together from its
    sized runs, and the bias study gets the dense runs that the digits sweep trained first (their records name
    digits)."""
    from datadiet_nb import presets
    from datadiet_nb.store import Store
    from datadiet_nb.sweep import run_sweep

    tiny = ["recipe.epochs=1", "scoring.num_runs=1", "scoring.epoch=1", "scoring.trajectory=", "seeds=0,1",
            "sparsities=0,0.5"]
    store = Store(tmp_path / "runs")
    digits = presets.with_overrides(presets.get("digits"), [*tiny, "scores=el2n"])
    bias = presets.with_overrides(presets.get("digits-bias"), [*tiny, "scores=el2n,random",
                                                               "scoring.epochs.forgetting=1"])
    regime = presets.with_overrides(presets.get("digits-regime"), [*tiny, "train_sizes=8,16", "scores=el2n"])
    for study in (digits, bias, regime):
        run_sweep(study, store, progress=False)
    studies = findings.studies_in(store)
    assert studies == {"digits": digits, "digits-bias": bias, "digits-regime": regime}
    results = findings.study_results(store, studies)
    dense_of_bias = results[(results["preset"] == "digits-bias") & (results["score"] == "dense")]
    assert dense_of_bias["seed"].nunique() == 2  # shared with digits, whose sweep trained them
    assert set(results.loc[results["preset"] == "digits-regime", "train_size"].round()) == {8, 16}
    table = findings.presets_table(studies, results)
    assert table.loc["digits-regime", "train images per class"] == "8, 16"
    assert table.loc["digits", "train images per class"] == "84 to 93" and table.loc["digits", "runs"] == 4
    assert "small data and models, not the paper's" in findings.scale_text(studies)
    rows = findings.findings_table(results)
    assert not rows["verdict"].str.contains("no dense runs").any()


def test_a_test_two_studies_share_counts_once_in_the_family():
    alone = findings.findings_table(pd.DataFrame(study("a", el2n_shift=0.0, std_factor=0.5)))
    twice = findings.findings_table(pd.DataFrame(study("a", el2n_shift=0.0, std_factor=0.5)
                                                 + study("b", el2n_shift=0.0, std_factor=0.5)))
    assert twice["p_adjusted"].tolist() == pytest.approx(alone["p_adjusted"].tolist() * 2)
