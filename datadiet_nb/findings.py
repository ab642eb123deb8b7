"""The poster's three claims, each tested on the records of every study in a store (the book's Findings page).

(i) The hardest classes keep the most data (paper Fig. 6: cat and dog, the worst classes of the dense CIFAR-10
model, have the highest keep ratio). Tested: the one-sided Spearman correlation, over classes, of EL2N's class keep
ratio with the dense model's class error (means over seeds).
(ii) Overall accuracy matches dense up to about half sparsity (paper Figs. 1-2). Tested: EL2N minus dense accuracy at
:data:`CLAIM_SPARSITY` (runs of one seed paired, seeds and test set counted); it holds when the whole 95 % interval
lies above -:data:`EQUIVALENCE_MARGIN`.
(iii) A range of sparsities where the std of class accuracies is below dense (paper Fig. 5). Tested: the one-sided
paired test of std below dense at every pruned sparsity up to :data:`SPREAD_RANGE_END`; it holds where one of them
is significant.

Every p-value of the page is adjusted together (Holm: the page is one family). A study is a preset as its records
hold it (with its overrides); its records are those of its grid, runs it shares with another preset included (a
dense run trained once serves every preset with its config). A preset with a grid of training-set sizes is read at
its largest size.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

import dataclasses

from .experiment import load_dataset
from .presets import DENSE, Preset, from_dict
from .report import per_class_range
from .results import load_results, paired_differences, with_adjusted_p
from .store import Store

SCORE = "el2n"
CLAIM_SPARSITY = 0.5  # "up to about 50 %": the claims are read at half the data
SPREAD_RANGE_END = 0.7  # the poster's "range of sparsities" for the spread, searched up to here
EQUIVALENCE_MARGIN = 0.02  # an accuracy within 2 points of dense counts as matching it
ALPHA = 0.05

CLAIMS = {  # claim -> (as the page names it, where the paper shows it)
    "keep": ("(i) The hardest classes keep the most data", "Fig. 6 (cat and dog)"),
    "accuracy": ("(ii) Accuracy matches dense up to about 50 % sparsity", "Figs. 1-2"),
    "spread": ("(iii) Some sparsity lowers the spread of class accuracies below dense", "Fig. 5"),
}
COLUMNS = ["claim", "paper", "preset", "result", "p", "p_adjusted", "verdict"]


def _at_largest_size(results: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The records at the preset's largest training-set size (all of them when there is one size) and a note."""
    sizes = results["train_size"].round().unique()
    if len(sizes) < 2:
        return results, ""
    largest = sizes.max()
    return results[results["train_size"].round() == largest], f" ({largest:,.0f} per class, the largest size)"


def _untestable(claim: str, preset: str, why: str) -> dict:
    return {"claim": claim, "preset": preset, "result": "-", "p": np.nan, "verdict": f"cannot be tested here: {why}"}


def _keep_claim(results: pd.DataFrame, preset: str) -> dict:
    pruned = results[(results["score"] == SCORE) & np.isclose(results["sparsity"], CLAIM_SPARSITY)]
    dense = results[results["score"] == DENSE]
    keep = pruned.groupby("class_index")["keep_ratio"].mean()
    error = 1 - dense.groupby("class_index")["class_accuracy"].mean()
    if np.ptp(keep.to_numpy()) == 0 or np.ptp(error.to_numpy()) == 0:
        return _untestable("keep", preset, "the keep ratios or the dense errors are the same for every class")
    rho, p = scipy_stats.spearmanr(keep.to_numpy(), error.loc[keep.index].to_numpy(), alternative="greater")
    names = results.drop_duplicates("class_index").set_index("class_index")["class"]
    kept_most = ", ".join(f"{names[c]} ({keep[c]:.2f})" for c in keep.sort_values(ascending=False).index[:2])
    hardest = ", ".join(str(names[c]) for c in error.sort_values(ascending=False).index[:2])
    result = (f"rho = {rho:.2f} over {len(keep)} classes; kept most: {kept_most}; hardest for dense: {hardest}")
    return {"claim": "keep", "preset": preset, "result": result, "p": float(p), "direction": float(rho)}


def _accuracy_claim(results: pd.DataFrame, preset: str) -> dict:
    row = paired_differences(results[(results["score"] == DENSE) | np.isclose(results["sparsity"], CLAIM_SPARSITY)],
                             [(SCORE, DENSE)], ["accuracy"]).iloc[0]
    if row["p"] != row["p"]:
        return _untestable("accuracy", preset, row["reason"])
    result = (f"{100 * row['difference']:+.1f} points at {100 * CLAIM_SPARSITY:.0f} % sparsity "
              f"(95 % CI {100 * row['difference_lo']:+.1f} to {100 * row['difference_hi']:+.1f}, "
              f"{int(row['num_seeds'])} seeds)")
    return {"claim": "accuracy", "preset": preset, "result": result, "p": row["p"], "direction": row["difference"],
            "lower": row["difference_lo"]}


def _spread_claims(results: pd.DataFrame, preset: str) -> list[dict]:
    within = results[(results["score"] == DENSE) | (results["sparsity"] <= SPREAD_RANGE_END + 1e-9)]
    tests = paired_differences(within, [(SCORE, DENSE)], ["std"], alternative="less")
    tests = tests[tests["p"].notna()]
    if tests.empty:
        return [_untestable("spread", preset, "no pruned sparsity with two paired seeds")]
    rows = []
    for _, row in tests.iterrows():
        result = (f"{100 * row['difference']:+.1f} points at {100 * row['sparsity']:.0f} % sparsity "
                  f"(95 % CI {100 * row['difference_lo']:+.1f} to {100 * row['difference_hi']:+.1f})")
        rows.append({"claim": "spread", "preset": preset, "result": result, "p": row["p"],
                     "direction": -row["difference"]})
    return rows


def preset_findings(results: pd.DataFrame, preset: str) -> list[dict]:
    """The rows of one preset's records (before the page's adjustment): one per claim, one per sparsity tested
    for claim (iii)."""
    results, note = _at_largest_size(results)
    label = preset + note
    rules = set(results["score"])
    missing = [rule for rule in (SCORE, DENSE) if rule not in rules]
    if missing or not np.isclose(results["sparsity"], CLAIM_SPARSITY).any():
        why = (f"no {' or '.join(missing)} runs" if missing else f"no runs at {100 * CLAIM_SPARSITY:.0f} % sparsity")
        return [_untestable(claim, label, why) for claim in CLAIMS]
    if results.loc[results["score"] == SCORE, "seed"].nunique() < 2:
        return ([_keep_claim(results, label)]
                + [_untestable(claim, label, "fewer than two seeds") for claim in ("accuracy", "spread")])
    return [_keep_claim(results, label), _accuracy_claim(results, label), *_spread_claims(results, label)]


def _verdict(row: pd.Series) -> str:
    if isinstance(row.get("verdict"), str):
        return row["verdict"]
    significant = row["p_adjusted"] < ALPHA
    if row["claim"] == "accuracy":
        if row["lower"] >= -EQUIVALENCE_MARGIN:
            return f"holds: the whole interval is above -{100 * EQUIVALENCE_MARGIN:.0f} points"
        if significant and row["direction"] < 0:
            return "does not hold: accuracy is below dense (adjusted test)"
        return f"not shown: the interval reaches below -{100 * EQUIVALENCE_MARGIN:.0f} points"
    if significant:
        return "holds (adjusted test)"
    return "not shown: the adjusted test is not significant"


def studies_in(store: Store) -> dict[str, Preset]:
    """Every study whose runs are in the store, by name: the preset each run record holds (``full_preset``). The
    runs of a grid of training-set sizes hold the preset at their size, and are put back together into it; a name
    run with different settings gives one study per setting (``name``, ``name (2)``, ...)."""
    by_name: dict[str, list[dict]] = {}
    for record in store.records():
        mapping = record["full_preset"]
        if mapping not in by_name.setdefault(mapping["name"], []):
            by_name[mapping["name"]].append(mapping)
    studies = {}
    for name, mappings in sorted(by_name.items()):
        found = [from_dict(mapping) for mapping in mappings]
        sizes = {preset.train_per_class for preset in found}
        unsized = [dataclasses.replace(preset, train_per_class=None) for preset in found]
        if len(found) > 1 and None not in sizes and all(preset == unsized[0] for preset in unsized):
            studies[name] = dataclasses.replace(unsized[0], train_sizes=tuple(sorted(sizes)))  # one grid's sizes
            continue
        for index, preset in enumerate(found):
            studies[name if index == 0 else f"{name} ({index + 1})"] = preset
    return studies


def study_results(store: Store, studies: dict[str, Preset]) -> pd.DataFrame:
    """The records of each study's grid (load_results columns, ``preset`` set to the study's name)."""
    from .sweep import jobs

    frames = []
    for name, preset in studies.items():
        keys = [job.key for job in jobs(preset, load_dataset(preset)) if job.kind == "run"]
        frames.append(load_results(store, keys=keys).assign(preset=name))
    return pd.concat(frames, ignore_index=True) if frames else load_results(store, keys=[])


def findings_table(results: pd.DataFrame) -> pd.DataFrame:
    """Every claim for every study in ``results`` (:func:`study_results`, one ``preset`` per study):
    :data:`COLUMNS`, with ``p_adjusted`` Holm's adjustment over every distinct test of the table (one that two
    studies share counts once). For claim (iii) only the sparsity with the lowest adjusted p (then raw p) is kept
    (all of them count in the family)."""
    rows = []
    for preset, records in results.groupby("preset", sort=True):
        rows += preset_findings(records, preset)
    table = pd.DataFrame(rows)
    # a test two studies share (the same runs: e.g. the bias study reuses the digits study's EL2N runs) counts once
    # in the family
    tests = with_adjusted_p(table.drop_duplicates(["claim", "result", "p"])[["claim", "result", "p"]])
    table = table.merge(tests, on=["claim", "result", "p"], how="left")
    table["verdict"] = table.apply(_verdict, axis=1)
    best = table.sort_values(["p_adjusted", "p"], na_position="last").drop_duplicates(["claim", "preset"])
    order = {claim: index for index, claim in enumerate(CLAIMS)}
    best = best.assign(order=best["claim"].map(order)).sort_values(["preset", "order"])
    best["paper"] = best["claim"].map(lambda claim: CLAIMS[claim][1])
    best["claim"] = best["claim"].map(lambda claim: CLAIMS[claim][0])
    return best[COLUMNS].reset_index(drop=True)


def findings_display(table: pd.DataFrame) -> pd.DataFrame:
    """The table as the page prints it: p-values to three decimals (``-`` where there is no test), claim and
    preset as the index; a Styler, so that no cell's text is cut short (pandas cuts long strings in its HTML)."""
    shown = table.copy()
    for column in ("p", "p_adjusted"):
        shown[column] = shown[column].map(lambda p: "-" if p != p else ("< 0.001" if p < 0.001 else f"{p:.3f}"))
    return shown.rename(columns={"p_adjusted": "p (Holm)"}).set_index(["claim", "preset"]).style


def presets_table(studies: dict[str, Preset], results: pd.DataFrame) -> pd.DataFrame:
    """What each study trained: one row per study (the index) with columns dataset, model, training images per
    class (before pruning; every size of a grid), test images per class, seeds, runs."""
    rows = []
    for name, preset in studies.items():
        dataset = load_dataset(preset)
        train = (", ".join(f"{size:,}" for size in preset.train_sizes) if preset.train_sizes
                 else per_class_range(dataset.train_labels.numpy()))
        records = results[results["preset"] == name]
        rows.append({"study": name, "dataset": preset.dataset, "model": preset.model,
                     "train images per class": train, "test images per class": per_class_range(dataset.test_labels.numpy()),
                     "seeds": records["seed"].nunique(), "runs": records["key"].nunique()})
    return pd.DataFrame(rows).set_index("study")


def scale_text(studies: dict[str, Preset]) -> str:
    """Which data the store's studies train on, and whether any is the paper's kind (CIFAR-10 or CIFAR-100)."""
    datasets = sorted({preset.dataset for preset in studies.values()})
    on_paper_data = [name for name in datasets if "cifar" in name.lower()]
    held = ", ".join(studies)
    if not on_paper_data:
        return (f"This build holds the studies {held}, on {', '.join(datasets)}: small data and models, not the "
                "paper's CIFAR-10 / ResNet-18 or CIFAR-100 / ResNet-50. The verdicts below are about these studies; "
                "they test the poster's claims, they do not reproduce its figures.")
    return (f"This build holds the studies {held}, on {', '.join(datasets)}; of these, {', '.join(on_paper_data)} "
            "is the paper's kind of data (check the model and the scale in the table before comparing numbers).")
