"""Run records of a store as one tidy pandas DataFrame, and the per-(score, sparsity) summary table."""

from __future__ import annotations

import os
import re
from typing import Iterable

import numpy as np
import pandas as pd

from . import stats
from .metrics import spread
from .errors import UserError
from .presets import DENSE
from .store import Store

CONFIG_COLUMNS = ["preset", "dataset", "model", "train_size", "score", "sparsity", "offset", "seed"]


def load_results(store: str | os.PathLike | Store, keys: Iterable[str] | None = None) -> pd.DataFrame:
    """One row per (run, class): the run's config columns (``train_size``: training examples per class before
    pruning, the mean over classes), ``class``, ``class_accuracy``, ``keep_ratio``,
    ``overall_accuracy``, plus ``class_index``, ``class_std`` (std of the run's class accuracies), ``key``
    and ``correct`` (which of the class's test images the run got right, in test-set order: for the bootstrap).

    ``keys`` restricts the table to those runs (e.g. the records a sweep returned)."""
    store = store if isinstance(store, Store) else Store(store)
    records = store.records() if keys is None else (store.load_run(k) for k in dict.fromkeys(keys))
    rows = []
    for record in filter(None, records):  # a record found corrupt is moved aside and left out
        run = {"preset": record["preset"], "dataset": record["dataset"]["name"], "model": record["model"],
               "train_size": record["dataset"]["num_train"] / len(record["classes"]), "score": record["score"], "sparsity": record["sparsity"], "offset": record["offset"],
               "seed": record["seed"], "overall_accuracy": record["overall_accuracy"],
               "class_std": record["bias"]["std"], "key": record["key"]}
        labels = np.asarray(record.get("test_labels", []), dtype=np.int64)
        hits = np.asarray(record["predictions"], dtype=np.int64) == labels if len(labels) else None
        for index, name in enumerate(record["classes"]):
            rows.append({**run, "class": name, "class_index": index,
                         "class_accuracy": record["class_accuracy"][index], "keep_ratio": record["keep_ratio"][index],
                         "correct": None if hits is None else hits[labels == index]})
    columns = CONFIG_COLUMNS + ["class", "class_index", "class_accuracy", "keep_ratio", "overall_accuracy",
                                "class_std", "key", "correct"]
    return pd.DataFrame(rows, columns=columns)


SUMMARY_STATISTICS = stats.RUN_STATISTICS
PER_CLASS_KEY = re.compile(r"class_\d+(_lo|_hi)?")  # summarize_group's per-class accuracies (class_summary's)


def _groups(results: pd.DataFrame):
    """(score, sparsity, runs of that point sorted by seed and class) for every point of the grid."""
    for (score, sparsity), group in results.groupby(["score", "sparsity"], sort=False):
        yield score, sparsity, group.sort_values(["seed", "class_index"])


def _correct(runs: pd.DataFrame) -> list[np.ndarray]:
    """Per class, the [runs, n_c] hits of every run of one grid point (the bootstrap's input)."""
    if runs["correct"].isna().any():
        raise UserError("some run records predate per-example test results (datadiet-nb < 0.2); "
                        "run the sweep again to record them")
    return [np.stack(list(per_class["correct"])) for _, per_class in runs.groupby("class_index")]


def summarize(results: pd.DataFrame, *, samples: int = stats.BOOTSTRAP_SAMPLES) -> pd.DataFrame:
    """One row per (score, sparsity): mean over seeds and 95 % bootstrap interval (``_lo``, ``_hi``) of the overall
    accuracy, the std of class accuracies (raw, and ``class_std_corrected`` for test-set noise), the worst class
    accuracy, the max - min gap, the coefficient of variation, the mean of the worst 10 % of classes, and against
    the dense run of the same seed the mean absolute change of class accuracy and the rank correlation of class
    keep ratio with dense class error (NaN without dense runs); ``worst_class`` (the most frequent worst class),
    ``num_seeds``, ``std_below_dense_p``: the one-sided paired test (pruned vs dense run of the same seed, seeds and
    test set both counted: :func:`~datadiet_nb.stats.paired_difference`) that the class std is below dense (NaN for
    the dense row or with fewer than two paired seeds), and ``std_below_dense_p_adjusted``: Holm's adjustment over
    the table's rows. See :mod:`datadiet_nb.stats` for the method."""
    dense_seeds = set(results.loc[results["score"] == DENSE, "seed"])
    pruned_rules = [score for score in dict.fromkeys(results["score"]) if score != DENSE]
    below_dense = paired_differences(results, [(score, DENSE) for score in pruned_rules], ["std"],
                                     samples=samples, alternative="less").set_index(["rule", "sparsity"])
    rows = []
    for score, sparsity, runs in _groups(results):
        row = {k: v for k, v in stats.summarize_group(_correct(runs), samples=samples).items()
               if not PER_CLASS_KEY.fullmatch(k)}
        worst = runs.loc[runs.groupby("key")["class_accuracy"].idxmin(), "class"]
        seeds = sorted(runs["seed"].unique())
        paired = [s for s in seeds if s in dense_seeds]
        test = below_dense.loc[(score, sparsity)] if (score, sparsity) in below_dense.index else None
        rows.append({"score": score, "sparsity": sparsity, **row, **_vs_dense(results, score, runs, paired, samples),
                     "worst_class": worst.mode().iloc[0],
                     "std_below_dense_p": float("nan") if test is None else test["p"],
                     "std_below_dense_p_adjusted": float("nan") if test is None else test["p_adjusted"],
                     "num_seeds": len(seeds)})
    table = pd.DataFrame(rows)
    return table.sort_values(["sparsity", "score"], ignore_index=True)


def _vs_dense(results: pd.DataFrame, score: str, runs: pd.DataFrame, paired: list, samples: int) -> dict[str, float]:
    """:func:`stats.summarize_vs_dense` of one grid point's runs that have a dense run of their seed (NaN if none)."""
    if score == DENSE or not paired:
        return {f"{name}{end}": float("nan") for name in stats.VS_DENSE_STATISTICS for end in ("", "_lo", "_hi")}
    pruned = runs[runs["seed"].isin(paired)]
    twins = results[(results["score"] == DENSE) & results["seed"].isin(paired)].sort_values(["seed", "class_index"])
    keep = pruned.pivot_table(index="seed", columns="class_index", values="keep_ratio").to_numpy()
    return stats.summarize_vs_dense(_correct(pruned), _correct(twins), keep, samples=samples)


def class_summary(results: pd.DataFrame, *, samples: int = stats.BOOTSTRAP_SAMPLES) -> pd.DataFrame:
    """One row per (score, sparsity, class): the class's test accuracy, mean over seeds, with its 95 % interval."""
    names = results.drop_duplicates("class_index").set_index("class_index")["class"]
    rows = []
    for score, sparsity, runs in _groups(results):
        summary = stats.summarize_group(_correct(runs), samples=samples)
        for index, name in names.items():
            rows.append({"score": score, "sparsity": sparsity, "class": name, "class_index": index,
                         "class_accuracy": summary[f"class_{index}"], "class_accuracy_lo": summary[f"class_{index}_lo"],
                         "class_accuracy_hi": summary[f"class_{index}_hi"]})
    return pd.DataFrame(rows).sort_values(["sparsity", "score", "class_index"], ignore_index=True)


def keep_ratio_table(results: pd.DataFrame) -> pd.DataFrame:
    """Class keep ratio (mean over seeds) with one row per (score, sparsity) and one column per class."""
    table = results.pivot_table(index=["score", "sparsity"], columns="class", values="keep_ratio", aggfunc="mean")
    order = results.drop_duplicates("class").sort_values("class_index")["class"]
    return table[list(order)].sort_index(level=["sparsity", "score"])


def format_table(table: pd.DataFrame) -> str:
    """A numeric table as text: three decimals, ``-`` where a value is missing (e.g. a class with no examples)."""
    return table.to_string(float_format=lambda v: f"{v:.3f}", na_rep="-")


def run_measures(results: pd.DataFrame) -> pd.DataFrame:
    """One row per run (score, sparsity, seed, key): its overall ``accuracy`` (where the table has it) and
    :func:`~datadiet_nb.metrics.spread` of its class accuracies."""
    rows = []
    for (score, sparsity, seed, key), run in results.groupby(["score", "sparsity", "seed", "key"], sort=False):
        measures = spread(run.sort_values("class_index")["class_accuracy"].to_numpy())
        rows.append({"score": score, "sparsity": sparsity, "seed": seed, "key": key,
                     **({"accuracy": float(run["overall_accuracy"].iloc[0])} if "overall_accuracy" in run else {}),
                     **{name: float(value) for name, value in measures.items()}})
    return pd.DataFrame(rows)


# The range of each measure a paired difference is taken of (the difference's interval is cut to the range of a
# difference): accuracies in [0, 1]; the population std of values in [0, 1] is at most 1/2; the gap up to 1.
MEASURE_RANGES = {"accuracy": (0.0, 1.0), "std": (0.0, 0.5), "worst": (0.0, 1.0), "best": (0.0, 1.0),
                  "gap": (0.0, 1.0), "worst_10pct": (0.0, 1.0)}
DIFFERENCE_COLUMNS = ["rule", "baseline", "sparsity", "measure", "difference", "difference_lo", "difference_hi", "p",
                      "p_adjusted", "num_seeds", "test_share", "reason"]


def class_measures(class_acc: np.ndarray, class_sizes: np.ndarray) -> dict[str, np.ndarray]:
    """Per run (class accuracies on the last axis, [..., C]): the overall ``accuracy`` (classes weighted by their
    test images) and :func:`~datadiet_nb.metrics.spread` of the class accuracies."""
    sizes = np.asarray(class_sizes, dtype=np.float64)
    return {"accuracy": (class_acc * sizes).sum(-1) / sizes.sum(), **spread(class_acc)}


def paired_differences(results: pd.DataFrame, pairs: Iterable[tuple[str, str]],
                       measures: Iterable[str] = ("std", "worst"), *, samples: int = stats.BOOTSTRAP_SAMPLES,
                       seed: int = stats.BOOTSTRAP_SEED, alternative: str = "two-sided") -> pd.DataFrame:
    """For each (rule, baseline) pair and sparsity where both ran, the difference rule - baseline of each measure
    over the seeds both have (runs of one seed paired): :func:`~datadiet_nb.stats.paired_difference`, whose error
    counts the seeds and the test set (``samples`` test sets drawn within each class, the same draw for both runs
    of every pair). The baseline ``dense`` is the dense run of the seed, whatever the rule's sparsity.

    Columns: :data:`DIFFERENCE_COLUMNS` — ``p`` the test (two-sided, or ``alternative="less"``), ``p_adjusted`` Holm's adjustment over every
    test of the frame (the family a table shows), ``reason`` why a row has no test."""
    measures = list(measures)
    rows = []
    for rule, baseline in pairs:
        for sparsity in sorted(results.loc[results["score"] == rule, "sparsity"].unique()):
            baseline_at = 0.0 if baseline == DENSE else sparsity
            mine = results[(results["score"] == rule) & (results["sparsity"] == sparsity)]
            theirs = results[(results["score"] == baseline) & (results["sparsity"] == baseline_at)]
            seeds = sorted(set(mine["seed"]) & set(theirs["seed"]))
            if theirs.empty or not seeds:
                continue
            rule_hits = _correct(mine[mine["seed"].isin(seeds)].sort_values(["seed", "class_index"]))
            baseline_hits = _correct(theirs[theirs["seed"].isin(seeds)].sort_values(["seed", "class_index"]))
            hits = [np.concatenate(pair) for pair in zip(rule_hits, baseline_hits)]  # per class [2 seeds, n_c]
            sizes = np.array([class_hits.shape[1] for class_hits in hits])
            observed = class_measures(np.stack([h.mean(1) for h in hits], axis=1), sizes)
            rng = np.random.default_rng(seed)
            resampled = class_measures(stats.bootstrap_class_accuracy(hits, samples=samples, rng=rng), sizes)
            n = len(seeds)
            for measure in measures:
                bounds = stats.difference_bounds(MEASURE_RANGES[measure])
                row = stats.paired_difference(observed[measure][:n], observed[measure][n:],
                                              resampled[measure][:, :n], resampled[measure][:, n:], bounds=bounds,
                                              alternative=alternative)
                rows.append({"rule": rule, "baseline": baseline, "sparsity": sparsity, "measure": measure, **row})
    frame = pd.DataFrame(rows, columns=DIFFERENCE_COLUMNS)
    return with_adjusted_p(frame)


def with_adjusted_p(differences: pd.DataFrame) -> pd.DataFrame:
    """The frame with ``p_adjusted``: Holm's adjustment of its ``p`` over all its rows (one family)."""
    return differences.assign(p_adjusted=stats.holm(differences["p"].to_numpy(dtype=np.float64)))


AREA_MEASURES = {"worst": "worst-class accuracy", "std": "std of class accuracies"}  # spread() names


def normalised_area(sparsities, values, axis: int = -1) -> np.ndarray:
    """The trapezoid area under ``values`` over ``sparsities`` (ascending, along ``axis``), divided by the range
    of the sparsities: the curve's mean height, in the measure's own units."""
    sparsities = np.asarray(sparsities, dtype=np.float64)
    values = np.moveaxis(np.asarray(values, dtype=np.float64), axis, -1)
    area = ((values[..., 1:] + values[..., :-1]) / 2 * np.diff(sparsities)).sum(-1)
    return area / (sparsities[-1] - sparsities[0])


def area_grid(results: pd.DataFrame, rules: Iterable[str] | None = None) -> list[float]:
    """The sparsities an area is taken over: 0 (the dense run) and every pruned sparsity that each of ``rules``
    (default: every pruned rule in the records) ran, so that the areas compared cover the same range."""
    rules = [rule for rule in (rules or dict.fromkeys(results["score"])) if rule != DENSE]
    ran = [set(results.loc[results["score"] == rule, "sparsity"]) - {0.0} for rule in rules]
    return sorted({0.0} | set.intersection(*ran)) if ran else [0.0]


def _curve_runs(results: pd.DataFrame, rule: str, points: list[float]) -> tuple[list, pd.DataFrame]:
    """(seeds, runs) of one rule's curve over ``points``: its runs there, starting from the dense run of the same
    seed, over the seeds that ran at every point (none when a point is missing altogether)."""
    own = results[(results["score"] == rule) & results["sparsity"].isin(points)]
    runs = pd.concat([results[results["score"] == DENSE].assign(sparsity=0.0), own[own["sparsity"] > 0]])
    seeds = sorted(set.intersection(*[set(runs.loc[np.isclose(runs["sparsity"], s), "seed"]) for s in points]))
    return seeds, runs[runs["seed"].isin(seeds)]


def area_per_seed(results: pd.DataFrame, rule: str, measure: str, points: list[float] | None = None) -> pd.Series:
    """Per seed, :func:`normalised_area` of a rule's ``measure`` (a :func:`~.metrics.spread` name) against
    sparsity over ``points`` (default: :func:`area_grid` of the records), from the dense run of the seed on. Empty
    when the rule misses a point of the grid."""
    points = area_grid(results) if points is None else points
    seeds, runs = _curve_runs(results, rule, points)
    if not seeds:
        return pd.Series([], dtype=np.float64, name=measure)
    per_run = run_measures(runs)
    table = per_run.pivot_table(index="seed", columns="sparsity", values=measure).loc[seeds, points]
    return pd.Series(normalised_area(points, table.to_numpy(), axis=1), index=seeds, name=measure)


def summarize_areas(results: pd.DataFrame, *, samples: int = stats.BOOTSTRAP_SAMPLES,
                    seed: int = stats.BOOTSTRAP_SEED) -> pd.DataFrame:
    """One row per pruned rule: the normalised area under its worst-class accuracy and its class-std curves over
    the common grid (:func:`area_grid`: the dense run of each seed at s = 0 and every sparsity all rules ran), mean
    over seeds with a 95 % bootstrap interval (test images drawn within each class, the same draw for every run of
    the rule, then the seeds).

    Columns: score, sparsities (points of the grid), num_seeds, missing (pruned sparsities of the preset's grid
    the rule did not run, left out of every rule's area), then ``<measure>_area``, ``_lo``, ``_hi`` for worst and
    std."""
    rules = [s for s in dict.fromkeys(results["score"]) if s != DENSE]
    points = area_grid(results, rules)
    every = sorted(set(results["sparsity"]) - {0.0})
    rows = []
    for rule in rules:
        seeds, runs = _curve_runs(results, rule, points)
        missing = sorted(set(every) - set(results.loc[results["score"] == rule, "sparsity"]))
        row = {"score": rule, "sparsities": len(points), "num_seeds": len(seeds),
               "missing": ", ".join(f"{s:g}" for s in missing)}
        if len(points) < 2 or not seeds:
            rows.append(row)
            continue
        ordered = runs.sort_values(["sparsity", "seed", "class_index"])
        correct = [np.stack(list(group["correct"])) for _, group in ordered.groupby("class_index")]  # [P*S, n_c]
        rng = np.random.default_rng(seed)
        replicates = stats.bootstrap_class_accuracy(correct, samples=samples, rng=rng)  # [B, P*S, C]
        for measure in AREA_MEASURES:
            per_seed = area_per_seed(results, rule, measure, points)
            boot = spread(replicates)[measure].reshape(samples, len(points), len(seeds))
            areas = normalised_area(points, boot, axis=1)  # [B, S]
            row[f"{measure}_area"] = float(per_seed.mean())
            row[f"{measure}_area_lo"], row[f"{measure}_area_hi"] = stats.interval(
                stats.seed_means(areas, rng))
        rows.append(row)
    columns = ["score", "sparsities", "num_seeds", "missing"] + [
        f"{measure}_area{end}" for measure in AREA_MEASURES for end in ("", "_lo", "_hi")]
    return pd.DataFrame(rows, columns=columns)


def area_differences(results: pd.DataFrame, pairs: Iterable[tuple[str, str]], *,
                     samples: int = stats.BOOTSTRAP_SAMPLES, seed: int = stats.BOOTSTRAP_SEED) -> pd.DataFrame:
    """For each (rule, baseline) pair of pruned rules, the difference of their normalised areas
    (:func:`area_per_seed`) over the sparsities both ran and the seeds both have, as
    :func:`~datadiet_nb.stats.paired_difference` (its error counts the seeds and the test set: ``samples`` test
    sets drawn within each class, the same draw for every run of both curves). Pairs with the dense run (no curve)
    or with fewer than two common points are left out.

    Columns: rule, baseline, measure, difference, difference_lo, difference_hi, p, p_adjusted (Holm, over the
    frame), num_seeds, test_share, reason."""
    rows = []
    for rule, baseline in pairs:
        if DENSE in (rule, baseline) or rule == baseline or not {rule, baseline} <= set(results["score"]):
            continue
        points = area_grid(results, [rule, baseline])
        if len(points) < 2:
            continue
        seeds = sorted(set(_curve_runs(results, rule, points)[0]) & set(_curve_runs(results, baseline, points)[0]))
        curves = []
        for name in (rule, baseline):
            runs = _curve_runs(results, name, points)[1]
            curves.append(_correct(runs[runs["seed"].isin(seeds)].sort_values(["sparsity", "seed", "class_index"])))
        hits = [np.concatenate(pair) for pair in zip(*curves)]  # per class [2 * points * seeds, n_c]
        sizes = np.array([class_hits.shape[1] for class_hits in hits])
        observed = class_measures(np.stack([h.mean(1) for h in hits], axis=1), sizes)
        rng = np.random.default_rng(seed)
        resampled = class_measures(stats.bootstrap_class_accuracy(hits, samples=samples, rng=rng), sizes)
        shape = (2, len(points), len(seeds))
        for measure in AREA_MEASURES:
            areas = normalised_area(points, observed[measure].reshape(shape), axis=1)  # [2, seeds]
            boot = normalised_area(points, resampled[measure].reshape(samples, *shape), axis=2)  # [B, 2, seeds]
            bounds = stats.difference_bounds(MEASURE_RANGES[measure])
            row = stats.paired_difference(areas[0], areas[1], boot[:, 0], boot[:, 1], bounds=bounds)
            rows.append({"rule": rule, "baseline": baseline, "measure": measure, **row})
    columns = [column for column in DIFFERENCE_COLUMNS if column != "sparsity"]
    return with_adjusted_p(pd.DataFrame(rows, columns=columns))
