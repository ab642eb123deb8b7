"""The numbers and tables the book quotes, computed from run records (never typed by hand)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .presets import DENSE, PRUNING_SCORES, Preset
from .prune import RULES
from .results import summarize
from .scores import SCORES
from .store import Store

HEADLINE_SPARSITY = 0.5
SAME_KEEP_RATIO = 0.005  # keep ratios closer than this count as one fraction of every class


class GlueText(str):
    """A string that myst-nb's ``{glue:text}`` shows as it is: myst-nb reads the glued text/plain back with
    ``ast.literal_eval``, so the repr is the string's own literal ("1,000" would otherwise become the tuple (1, 0))."""

    def __repr__(self) -> str:
        return repr(str(self))


def pruning_scores(results: pd.DataFrame) -> list[str]:
    return [s for s in PRUNING_SCORES if s in set(results["score"])]


def score_labels(preset: Preset) -> dict[str, str]:
    """Display names of the scores with their scoring epoch (``EL2N@20``), as figures and tables show them."""
    labels = {DENSE: "Dense", "random": "Random", "forgetting": f"Forgetting@{preset.scoring.epoch_of('forgetting')}",
              "ccs": f"CCS ({preset.scoring.label('el2n')})", "drop": "DRoP",
              "drop-el2n": f"DRoP ({preset.scoring.label('el2n')})", **{s: preset.scoring.label(s) for s in SCORES}}
    for rule, base in RULES.items():
        if rule not in labels:  # random-balanced, el2n-matched, ...: the base's name and how it differs
            labels[rule] = f"{labels.get(base or 'random')} {rule.rpartition('-')[2]}"
    return labels


def _nearest(results: pd.DataFrame, score: str, target: float) -> float | None:
    sparsities = results.loc[results["score"] == score, "sparsity"].unique()
    return None if len(sparsities) == 0 else float(min(sparsities, key=lambda s: abs(s - target)))


def _percent(value: float) -> GlueText:
    return GlueText(f"{100 * value:.1f} %")


def with_interval(row: pd.Series, name: str) -> GlueText:
    """``62.7 % (95 % CI 61.8–63.5)`` from a summary row's value and its ``_lo`` / ``_hi``."""
    return GlueText(f"{100 * row[name]:.1f} % (95 % CI {100 * row[name + '_lo']:.1f}–{100 * row[name + '_hi']:.1f})")


def p_value(p: float) -> GlueText:
    """A p-value as the text quotes it; n/a where the test cannot be made (fewer than two paired seeds, or the
    same difference in every pair)."""
    if p != p:
        return GlueText("n/a (fewer than two paired seeds, or no variation between them)")
    return GlueText(f"p = {p:.3f}" if p >= 0.001 else "p < 0.001")


def std_verdict(p: float, alpha: float = 0.05) -> GlueText:
    """What the paired test lets the text say about 'spread below dense', and nothing more."""
    if p != p:
        return GlueText("cannot be tested (fewer than two paired seeds, or no variation between them)")
    return GlueText("is lower than dense" if p < alpha else "is not shown to be lower than dense")


def headline_numbers(results: pd.DataFrame, summary: pd.DataFrame | None = None) -> dict[str, GlueText]:
    """The numbers the text quotes, each from the records with its 95 % interval: dense accuracy and spread,
    the worst dense class, and per score at 50 % sparsity (or the nearest sparsity run, which the text then
    names) the accuracy, the spread (raw and corrected), the paired test against dense and the most-kept classes."""
    summary = summarize(results) if summary is None else summary
    runs = results.drop_duplicates("key")
    dense = summary[summary["score"] == DENSE]
    dense_classes = results[results["score"] == DENSE].groupby("class")["class_accuracy"].mean()
    na = GlueText("n/a")
    numbers = {
        "dense_accuracy": with_interval(dense.iloc[0], "overall_accuracy") if len(dense) else na,
        "dense_class_std": with_interval(dense.iloc[0], "class_std") if len(dense) else na,
        "dense_class_std_corrected": with_interval(dense.iloc[0], "class_std_corrected") if len(dense) else na,
        "dense_worst_class": GlueText(f"{dense_classes.idxmin()} ({_percent(dense_classes.min())})")
        if len(dense_classes) else na,
        "num_runs": GlueText(str(len(runs))),
        "num_seeds": GlueText(str(runs["seed"].nunique())),
    }
    for score in PRUNING_SCORES:
        sparsity = _nearest(results, score, HEADLINE_SPARSITY)
        where = "" if sparsity in (None, HEADLINE_SPARSITY) else f" (at sparsity {sparsity:g})"
        at = summary[(summary["score"] == score) & (summary["sparsity"] == sparsity)]
        keep = results[(results["score"] == score) & (results["sparsity"] == sparsity)]
        top = top_keep_classes(keep.groupby("class")["keep_ratio"].mean())
        row = at.iloc[0] if len(at) else None
        numbers[f"{score}_accuracy_50"] = GlueText(with_interval(row, "overall_accuracy") + where) if row is not None else na
        numbers[f"{score}_class_std_50"] = GlueText(with_interval(row, "class_std") + where) if row is not None else na
        numbers[f"{score}_class_std_corrected_50"] = (GlueText(with_interval(row, "class_std_corrected") + where)
                                                      if row is not None else na)
        numbers[f"{score}_std_p_50"] = p_value(row["std_below_dense_p_adjusted"]) if row is not None else na
        numbers[f"{score}_std_verdict_50"] = std_verdict(row["std_below_dense_p_adjusted"]) if row is not None else na
        numbers[f"{score}_top_keep_classes"] = GlueText(top + where) if top else na
    return numbers


BUDGET_TEXT = {
    "steps": "every pruned subset trains for as many optimiser steps as the full training set (Data Diet's rule)",
    "epochs": "every pruned subset trains for as many epochs as the full training set (fewer steps when pruned)",
}


def top_keep_classes(keep_ratio: pd.Series) -> str:
    """The two classes kept most (``cat (0.90) and dog (0.71)``), or ``every class alike (0.50)`` when the rule
    keeps the same fraction of every class (to the rounding of one example); "" for no classes."""
    if keep_ratio.empty:
        return ""
    if keep_ratio.max() - keep_ratio.min() < SAME_KEEP_RATIO:
        return f"every class alike ({keep_ratio.mean():.2f})"
    return " and ".join(f"{c} ({r:.2f})" for c, r in keep_ratio.sort_values(ascending=False).head(2).items())


def study_numbers(preset: Preset) -> dict[str, GlueText]:
    """What the text says about how the study was run: the budget rule and each score's name with its epoch."""
    labels = score_labels(preset)
    each = " of its own for each training seed" if preset.scoring.per_seed else ""
    return {"budget": GlueText(BUDGET_TEXT[preset.recipe.budget]),
            "score_epochs": GlueText(", ".join(f"{labels[s]} (epoch {preset.scoring.epoch_of(s)} of the scoring "
                                               f"runs, K = {preset.scoring.num_runs}{each})" for s in SCORES)),
            **{f"{s}_label": GlueText(labels[s]) for s in SCORES}}


def per_class_range(labels: np.ndarray) -> str:
    """How many examples each class has: ``90``, or ``84 to 93`` where the classes differ."""
    counts = np.bincount(labels)
    return f"{counts.min():,}" if counts.min() == counts.max() else f"{counts.min():,} to {counts.max():,}"


def scale_text(preset: Preset, train_labels: np.ndarray, test_labels: np.ndarray, num_seeds: int) -> GlueText:
    """How large the study is: the model, the training and test images per class, and the seeds."""
    def per_class(labels: np.ndarray) -> str:
        return f"{per_class_range(labels)} per class ({len(labels):,} in all)"

    options = ", ".join(f"{name} {value}" for name, value in preset.model_options.items())
    return GlueText(f"{preset.model}{f' ({options})' if options else ''} on {preset.dataset}: training images "
                    f"{per_class(train_labels)}, test images {per_class(test_labels)}, {num_seeds} seeds")


def study_notes(preset: Preset):
    """What a reader must know about how this study departs from the paper's setting (Markdown), or None."""
    notes = []
    if preset.train_per_class is not None:
        scored = ("scores come from scoring runs on the **full** training set and are restricted to the subset"
                  if preset.scoring.full_train else "the scores are computed on that subset")
        notes.append(f"The training grid uses a class-balanced subset, the first {preset.train_per_class} training "
                     f"images of each class, and {scored}. This is a small-data regime: its accuracy curves "
                     "may differ from the paper's (pruning a small set removes examples the model still needs), "
                     "and are shown as they came out. Where keeping the hardest examples starts to pay is measured "
                     "by a preset with training-set sizes (`cifar10-cpu-regime`) in the chapter \"Which examples to "
                     "keep depends on how many you have\".")
    width = preset.model_options.get("width")
    if width is not None and preset.model.startswith("resnet") and width != 64:
        notes.append(f"The {preset.model} is narrow (first stage width {width}, against 64 in the paper), "
                     "so that the study runs on a CPU.")
    if not notes:
        return None
    from IPython.display import Markdown
    return Markdown("**How this study differs from the paper's setting.** " + " ".join(notes))


def summary_table(results: pd.DataFrame, labels: dict[str, str] | None = None,
                  summary: pd.DataFrame | None = None) -> pd.DataFrame:
    """Sparsity x score, each number with its 95 % interval: overall accuracy, std of class accuracy (raw and
    corrected for test noise), worst class accuracy and class, the paired-test p-value, seeds."""
    table = summarize(results) if summary is None else summary
    labels = labels or {}

    def cell(row: pd.Series, name: str) -> str:
        return f"{row[name]:.3f} [{row[name + '_lo']:.3f}, {row[name + '_hi']:.3f}]"

    rows = [{"sparsity": row["sparsity"], "score": labels.get(row["score"], row["score"]),
             "accuracy": cell(row, "overall_accuracy"), "class std": cell(row, "class_std"),
             "class std (corrected)": cell(row, "class_std_corrected"),
             "worst class acc.": cell(row, "worst_class_accuracy"), "worst class": row["worst_class"],
             "p (std < dense, Holm)": "-" if row["std_below_dense_p_adjusted"] != row["std_below_dense_p_adjusted"]
             else f"{row['std_below_dense_p_adjusted']:.3f}", "seeds": int(row["num_seeds"])}
            for _, row in table.iterrows()]
    return pd.DataFrame(rows).set_index(["sparsity", "score"])


def run_table(record: dict) -> pd.DataFrame:
    """One run's per-class test accuracy and keep ratio."""
    return pd.DataFrame({"class": record["classes"], "test accuracy": record["class_accuracy"],
                         "keep ratio": record["keep_ratio"]}).set_index("class").round(4)


def provenance_table(results: pd.DataFrame, store: str | Store) -> pd.DataFrame:
    """Versions, hardware, commit and wall time of the runs on this page, one row per distinct setup."""
    store = store if isinstance(store, Store) else Store(store)
    rows = []
    for key in results["key"].unique():
        record = store.load_run(key)
        p = record["provenance"]
        rows.append({"datadiet_nb": p["datadiet_nb"], "torch": p["torch"], "cuda": p["cuda"] or "-",
                     "device": p["device_name"], "git commit": (p["git_commit"] or "-")[:12],
                     "seconds": record["seconds"]})
    frame = pd.DataFrame(rows)
    group = ["datadiet_nb", "torch", "cuda", "device", "git commit"]
    return frame.groupby(group).agg(runs=("seconds", "size"), total_seconds=("seconds", "sum")).round(1)



def stage_times(store: str | Store) -> pd.DataFrame:
    """Wall time of each stage in the store: scoring (per scores file) and training runs (per preset and score)."""
    store = store if isinstance(store, Store) else Store(store)
    rows = []
    for path in sorted((store.root / "scores").glob("*.json")):
        from .store import read_json
        config = read_json(path)
        rows.append({"stage": "scoring", "what": f"{config['dataset']['name']} / {config['model']}, "
                     f"K={config['scoring']['num_runs']}, t={config['scoring']['epoch']}",
                     "count": config["scoring"]["num_runs"], "seconds": config["seconds"]})
    runs = pd.DataFrame([{"preset": r["preset"], "score": r["score"], "seconds": r["seconds"]}
                         for r in store.records()])
    if len(runs):
        for (preset, score), group in runs.groupby(["preset", "score"]):
            rows.append({"stage": "training", "what": f"{preset}: {score}", "count": len(group),
                         "seconds": group["seconds"].sum()})
    return pd.DataFrame(rows, columns=["stage", "what", "count", "seconds"]).round(1)


def environment_table(store: str | Store) -> pd.DataFrame:
    """Package, torch, CUDA, device and git commit of every run in the store, with run counts."""
    store = store if isinstance(store, Store) else Store(store)
    rows = [{"preset": r["preset"], **{k: r["provenance"][k] or "-" for k in
             ("datadiet_nb", "python", "torch", "cuda", "device_name", "cpu_count", "git_commit")}}
            for r in store.records()]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    return frame.groupby(list(frame.columns)).size().rename("runs").reset_index()


def recipe_table(preset: Preset) -> pd.DataFrame:
    """The preset's complete config as one key/value table (dataset, model, recipe, scoring, grid)."""
    flat = pd.json_normalize(preset.to_dict(), sep=".").T
    flat.columns = ["value"]
    flat["value"] = flat["value"].map(lambda v: ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v))
    return flat.rename_axis("setting")


def ranking_note(accuracy: pd.Series, sizes: np.ndarray) -> GlueText | None:
    """None where a validation split's class accuracies (``accuracy``, on ``sizes`` images per class) spread beyond
    their sampling noise (the 95 % lower bound of the noise-corrected std above zero), so they can rank the
    classes; else the sentence that says why the best and worst classes are not drawn."""
    from . import stats

    lo, hi = stats.corrected_std_interval(accuracy.to_numpy(), sizes)
    if lo > 0:
        return None
    return GlueText(f"The best and worst classes are not drawn: the validation split ({int(sizes.min())} to "
                    f"{int(sizes.max())} images per class) cannot rank the classes, since the spread of its class "
                    f"accuracies (noise-corrected std, 95 % interval {lo:.3f} to {hi:.3f}) is not shown to exceed "
                    "its sampling noise; ranking them on the test set instead would show the classes whose test "
                    "accuracy happened to come out low.")


def plan_text(preset: Preset, states: list[str], store: str) -> str:
    """What running a chapter computes, from the states of its preset's jobs (``sweep.status``): how many jobs
    the grid has and how many are still to run."""
    missing = sum(state != "done" for state in states)
    head = f"Preset {preset.name}, store {store}: {len(states)} jobs (scoring runs, their mean and training runs)"
    if not missing:
        return head + ", all stored: nothing to train; the figures and tables below are computed from the records."
    return (head + f", {missing} still to run: they run first (a progress bar follows), then the figures and "
            "tables below are computed from the records.")


def failures_note(failures: dict[str, str]):
    """A visible note naming the jobs that failed (and so are missing from every figure and table); None if none."""
    if not failures:
        return None
    from IPython.display import Markdown
    lines = [f"- `{label}`: {message.splitlines()[0] if message else 'failed'}" for label, message in failures.items()]
    return Markdown("**Failed jobs, left out of every figure and table on this page** "
                    "(`datadiet-nb sweep --retry-failed` runs them again):\n\n" + "\n".join(lines))


# --- the bias chapter ----------------------------------------------------------------------------

ALPHA = 0.05


def bias_pairs(rules: list[str]) -> list[tuple[str, str]]:
    """What each rule is compared with: random pruning, a score's ``-matched`` twin (same per-class counts,
    examples drawn at random), whose difference is the effect of *which* examples are kept, and the dense run."""
    pruned = [rule for rule in rules if rule != DENSE]
    pairs = [(rule, "random") for rule in pruned if rule != "random"]
    pairs += [(score, f"{score}-matched") for score in SCORES if f"{score}-matched" in rules and score in rules]
    return pairs + [(rule, DENSE) for rule in pruned]


def difference_text(row: pd.Series | None, points: bool = True) -> GlueText:
    """``-1.2 points (95 % CI -2.0 to -0.4, p = 0.010, Holm-adjusted 0.040, 3 seeds)`` for a row of
    :func:`.results.paired_differences`; without a test, the difference and why there is none."""
    if row is None:
        return GlueText("n/a (not run)")
    scale, unit = (100, " points") if points else (1, "")
    value = f"{scale * row['difference']:+.1f}{unit}"
    if row["p"] != row["p"] and row.get("reason"):
        return GlueText(f"{value} ({row['reason']})")
    interval = ("" if row["difference_lo"] != row["difference_lo"] else
                f"95 % CI {scale * row['difference_lo']:+.1f} to {scale * row['difference_hi']:+.1f}, ")
    adjusted = "" if tested_p(row) == row["p"] else f", Holm-adjusted {p_value(tested_p(row)).removeprefix('p = ')}"
    return GlueText(f"{value} ({interval}{p_value(row['p'])}{adjusted}, {int(row['num_seeds'])} seeds)")


def tested_p(row: pd.Series) -> float:
    """The p-value a verdict is read from: adjusted for the table's multiplicity where the row has it."""
    adjusted = row.get("p_adjusted", float("nan"))
    return row["p"] if adjusted != adjusted else adjusted


def _difference(differences: pd.DataFrame, rule: str, baseline: str, measure: str, sparsity: float):
    match = differences[(differences["rule"] == rule) & (differences["baseline"] == baseline)
                        & (differences["measure"] == measure) & np.isclose(differences["sparsity"], sparsity)]
    return match.iloc[0] if len(match) else None


def _says(row: pd.Series | None, lower: str, higher: str, neither: str) -> GlueText:
    """What a paired difference lets the text say: its direction only when its adjusted p (:func:`tested_p`) is
    below ALPHA."""
    if row is None or tested_p(row) != tested_p(row) or tested_p(row) >= ALPHA:
        return GlueText(neither)
    return GlueText(lower if row["difference"] < 0 else higher)


def bias_numbers(summary: pd.DataFrame, differences: pd.DataFrame, labels: dict[str, str],
                 sparsity: float = HEADLINE_SPARSITY) -> dict[str, GlueText]:
    """The bias chapter's glued numbers and the sentences they allow, at ``sparsity``: each claim is worded from
    its paired test, and says so when the data do not support it."""
    numbers: dict[str, GlueText] = {"bias_sparsity": GlueText(f"{100 * sparsity:.0f} %")}
    el2n, matched = labels.get("el2n", "EL2N"), labels.get("el2n-matched", "EL2N matched")
    which = _difference(differences, "el2n", "el2n-matched", "std", sparsity)
    numbers["which_std"] = difference_text(which)
    numbers["which_worst"] = difference_text(_difference(differences, "el2n", "el2n-matched", "worst", sparsity))
    numbers["which_verdict"] = _says(
        which, f"which examples {el2n} keeps lowers the spread beyond how many of each class it keeps",
        f"which examples {el2n} keeps raises the spread beyond how many of each class it keeps",
        f"the data do not show that which examples {el2n} keeps matters beyond how many of each class it keeps "
        f"({matched} keeps the same counts at random)")
    for rule in ("el2n", "el2n-balanced", "el2n-matched", "drop", "ccs", "forgetting"):
        for measure in ("std", "worst"):
            numbers[f"{rule.replace('-', '_')}_vs_random_{measure}"] = difference_text(_difference(differences, rule, "random", measure,
                                                                                 sparsity))
    drop_worst = _difference(differences, "drop", "random", "worst", sparsity)
    numbers["drop_verdict"] = _says(
        drop_worst, "DRoP lowers the worst-class accuracy compared with random pruning",
        "DRoP raises the worst-class accuracy compared with random pruning",
        "the data do not show that DRoP changes the worst-class accuracy compared with random pruning")
    at = summary[np.isclose(summary["sparsity"], sparsity)].set_index("score")
    if "el2n" in at.index:
        row = at.loc["el2n"]
        rho = row["keep_error_spearman"]
        numbers["el2n_keep_error_rho"] = GlueText(
            f"{rho:.2f} (95 % CI {row['keep_error_spearman_lo']:.2f} to {row['keep_error_spearman_hi']:.2f})")
        p = row["std_below_dense_p_adjusted"]
        claim = "the claim of the poster that moderate pruning lowers the spread"
        at_point = f"at {100 * sparsity:.0f} % sparsity the spread under {el2n}"
        worst = _difference(differences, "el2n", DENSE, "worst", sparsity)
        numbers["poster_claim"] = GlueText(
            (f"supports {claim}: {at_point} is lower than dense ({p_value(p)})" if p == p and p < ALPHA else
             f"does not support {claim}: {at_point} is not shown to be lower than dense ({p_value(p)})")
            + ("" if worst is None else "; " + _says(
                worst, f"but its worst class falls too, by {difference_text(worst)}: the spread narrows by levelling down",
                f"and its worst class rises, by {difference_text(worst)}",
                f"its worst class is not shown to change: {difference_text(worst)}")))
    return numbers


def _cell(row: pd.Series, name: str) -> str:
    """``0.123 [0.100, 0.150]``, or ``-`` where the value is undefined."""
    if row[name] != row[name]:
        return "-"
    if row[name + "_lo"] != row[name + "_lo"]:
        return f"{row[name]:.3f}"
    return f"{row[name]:.3f} [{row[name + '_lo']:.3f}, {row[name + '_hi']:.3f}]"


def bias_table(summary: pd.DataFrame, labels: dict[str, str] | None = None) -> pd.DataFrame:
    """Sparsity x rule, every bias measure with its 95 % interval (the bias chapter's summary)."""
    from .plots import shown_bias_measures

    labels = labels or {}
    measures = shown_bias_measures(summary)
    rows = [{"sparsity": row["sparsity"], "rule": labels.get(row["score"], row["score"]),
             **{title: _cell(row, name) for name, title in measures.items()}, "seeds": int(row["num_seeds"])}
            for _, row in summary.iterrows()]
    return pd.DataFrame(rows).set_index(["sparsity", "rule"])


def difference_cell(row: pd.Series) -> str:
    """``-0.012 [-0.020, -0.004], p = 0.040`` for a row of paired differences (a table cell; p adjusted for the
    table's multiplicity where the row has it, see :func:`tested_p`), or ``+0.012 (no test: ...)``."""
    if row["p"] != row["p"]:
        return f"{row['difference']:+.3f}" + (f" (no test: {row['reason']})" if row.get("reason") else "")
    return _cell(row, "difference") + f", {p_value(tested_p(row))}"


def differences_table(differences: pd.DataFrame, labels: dict[str, str] | None = None, *, columns: str = "sparsity",
                      measures: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per (rule, baseline, [sparsity,] measure), one column per value of ``columns`` (sparsity, or e.g.
    training-set size): the paired difference with its 95 % t interval and the paired test's p; ``measures``
    renames them. With another ``columns`` than sparsity, the rows name the sparsity when there is more than one."""
    labels = labels or {}
    if differences.empty:
        return pd.DataFrame()
    frame = differences.assign(rule=differences["rule"].map(lambda r: labels.get(r, r)),
                               vs=differences["baseline"].map(lambda r: labels.get(r, r)),
                               measure=differences["measure"].map(lambda m: (measures or {}).get(m, m)),
                               text=differences.apply(difference_cell, axis=1))
    index = ["rule", "vs", "measure"]
    if columns != "sparsity" and frame["sparsity"].nunique() > 1:
        index.insert(2, "sparsity")
    if frame.duplicated(index + [columns]).any():
        raise ValueError(f"differences_table: more than one difference per {index + [columns]}")
    return frame.pivot_table(index=index, columns=columns, values="text", aggfunc="first", sort=False)


def area_table(areas: pd.DataFrame, differences: pd.DataFrame, labels: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per rule: the normalised areas under its worst-class and class-std curves with 95 % intervals, and
    their paired differences from random pruning (95 % t interval, p); a column of the sparsities a rule did not
    run (so every area is over the grid all rules ran) where one did not."""
    labels = labels or {}
    rows = []
    for _, row in areas.iterrows():
        line = {"rule": labels.get(row["score"], row["score"])}
        for measure, title in (("worst", "worst-class area"), ("std", "class-std area")):
            line[title] = _cell(row.rename(lambda name: name.replace(f"{measure}_area", "value")), "value")
            match = differences[(differences["rule"] == row["score"]) & (differences["baseline"] == "random")
                                & (differences["measure"] == measure)]
            line[f"{title} vs random"] = "-" if match.empty else difference_cell(match.iloc[0])
        line["seeds"] = int(row["num_seeds"])
        if areas["missing"].astype(bool).any():
            line["not run at s ="] = row["missing"] or "-"
        rows.append(line)
    return pd.DataFrame(rows).set_index("rule")
