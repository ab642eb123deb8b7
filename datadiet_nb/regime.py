"""The regime chapter's numbers: each rule's accuracy and class-wise bias against training-set size, where keeping
the hardest and keeping the easiest examples cross, and which side of it a study sits on (Sorscher et al., 2022).

Everything is computed from the run records of a preset with ``train_sizes``; sizes are per class.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import stats
from .errors import UserError
from .presets import CIFAR10_CPU, DENSE, PAPER_RECIPE, PAPER_SCORING, Preset
from .report import GlueText, _cell, _difference, _says, difference_text, top_keep_classes
from .report import differences_table as report_differences_table
from .results import _correct, keep_ratio_table, paired_differences, summarize, with_adjusted_p

HARD, EASY = "el2n", "el2n-easy"
PAPER_PER_CLASS = 5000  # the paper's CIFAR-10 training set: all 50,000 images
PAPER_WIDTH = 64  # the first stage of the paper's ResNet-18
REFERENCE_PER_CLASS = CIFAR10_CPU.train_per_class  # the cifar10-cpu study, whose EL2N lost to random
MEASURES = {"accuracy": "accuracy", "std": "class std", "worst": "worst class"}  # paired measures, as tables name them


def sizes_of(results: pd.DataFrame) -> list[int]:
    """The training-set sizes (examples per class) the records hold, ascending."""
    return sorted(int(round(size)) for size in results["train_size"].unique())


def _at(results: pd.DataFrame, size: int) -> pd.DataFrame:
    return results[np.isclose(results["train_size"], size)]


def summary_by_size(results: pd.DataFrame, *, samples: int = stats.BOOTSTRAP_SAMPLES) -> pd.DataFrame:
    """:func:`~datadiet_nb.results.summarize` of each training-set size, with its ``train_size`` column."""
    return pd.concat([summarize(_at(results, size), samples=samples).assign(train_size=size)
                      for size in sizes_of(results)], ignore_index=True)


def regime_pairs(rules: list[str]) -> list[tuple[str, str]]:
    """Keep-hard against keep-easy, then every rule against random, the hard rule against its matched twin, and
    every rule against the dense run (the bias chapter's comparisons)."""
    from .report import bias_pairs

    return ([(HARD, EASY)] if {HARD, EASY} <= set(rules) else []) + bias_pairs(rules)


def differences_by_size(results: pd.DataFrame, pairs: list[tuple[str, str]]) -> pd.DataFrame:
    """:func:`~datadiet_nb.results.paired_differences` of accuracy, class std and worst class at each size, with
    ``p_adjusted`` over every test of every size (one family: the chapter's table)."""
    frames = [paired_differences(_at(results, size), pairs, measures=tuple(MEASURES)).assign(train_size=size)
              for size in sizes_of(results)]
    return with_adjusted_p(pd.concat(frames, ignore_index=True))


def crossing_point(sizes, gaps) -> float:
    """Where a gap that changes sign between two sizes is zero, interpolated linearly in log size; the first such
    point from the smallest size, a size where the gap is exactly zero, or NaN if the sign never changes."""
    sizes, gaps = np.asarray(sizes, dtype=np.float64), np.asarray(gaps, dtype=np.float64)
    order = np.argsort(sizes)
    plain, gaps = sizes[order], gaps[order]
    sizes = np.log(plain)
    for i in range(len(sizes)):
        if gaps[i] == 0:
            return float(plain[i])
        if i + 1 < len(sizes) and gaps[i] * gaps[i + 1] < 0:
            return float(np.exp(sizes[i] + (sizes[i + 1] - sizes[i]) * gaps[i] / (gaps[i] - gaps[i + 1])))
    return float("nan")


def sign_changes(gaps) -> int:
    """How many times a gap changes sign from one size to the next (a zero counts as a change once)."""
    signs = np.sign(np.asarray(gaps, dtype=np.float64))
    signs = signs[signs != 0] if (signs != 0).any() else signs
    return int((np.diff(signs) != 0).sum()) + int((np.asarray(gaps) == 0).any())


def _hits(results: pd.DataFrame, size: int, rule: str, sparsity: float, seeds: list) -> list[np.ndarray]:
    runs = _at(results, size)
    runs = runs[(runs["score"] == rule) & np.isclose(runs["sparsity"], sparsity) & runs["seed"].isin(seeds)]
    return _correct(runs.sort_values(["seed", "class_index"]))


def crossing(results: pd.DataFrame, *, hard: str = HARD, easy: str = EASY, sparsity: float = 0.5,
             samples: int = stats.BOOTSTRAP_SAMPLES, seed: int = stats.BOOTSTRAP_SEED) -> dict:
    """Where the accuracy of ``hard`` minus that of ``easy`` (runs of one seed paired) changes sign across sizes.

    Returns the sizes, the gap at each (mean over the seeds both ran), the crossing (:func:`crossing_point`, NaN
    if none), and its 95 % bootstrap interval over the replicates that cross (test images drawn with replacement
    within each class, the same draw for every run, then the seeds), with the fraction of replicates that cross
    within the range (an interval from fewer than 95 % of them is open on that side).
    """
    sizes = sizes_of(results)
    runs = results[np.isclose(results["sparsity"], sparsity)]
    missing = [rule for rule in (hard, easy) if rule not in set(runs["score"])]
    if missing:
        raise UserError(f"the regime chapter compares {hard} with {easy} at sparsity {sparsity:g}, but the records "
                        f"hold no runs of {', '.join(missing)}: add it to the preset's scores")
    seeds = sorted(set.intersection(*[set(_at(runs, n).loc[lambda frame: frame["score"] == rule, "seed"])
                                      for n in sizes for rule in (hard, easy)]))
    parts = [_hits(results, n, rule, sparsity, seeds) for n in sizes for rule in (hard, easy)]
    stacked = [np.concatenate([part[c] for part in parts]) for c in range(len(parts[0]))]  # [runs, n_c] per class
    class_sizes = np.array([hits.shape[1] for hits in stacked], dtype=np.float64)

    def gaps_of(class_acc: np.ndarray) -> np.ndarray:  # [..., runs, C] -> [..., sizes, seeds]
        overall = (class_acc * class_sizes).sum(-1) / class_sizes.sum()
        per = overall.reshape(*overall.shape[:-1], len(sizes), 2, len(seeds))
        return per[..., 0, :] - per[..., 1, :]

    observed = gaps_of(np.stack([hits.mean(1) for hits in stacked], axis=1))  # [sizes, seeds]
    rng = np.random.default_rng(seed)
    replicates = gaps_of(stats.bootstrap_class_accuracy(stacked, samples=samples, rng=rng))  # [B, sizes, seeds]
    drawn = rng.integers(len(seeds), size=(samples, len(seeds)))
    boot = np.take_along_axis(replicates, drawn[:, None, :], axis=2).mean(2)  # [B, sizes]
    points = np.array([crossing_point(sizes, gap) for gap in boot])
    crossed = points[~np.isnan(points)]
    lo, hi = stats.interval(crossed) if len(crossed) else (float("nan"), float("nan"))
    gaps = observed.mean(1)
    return {"sizes": sizes, "gaps": gaps, "point": crossing_point(sizes, gaps), "sign_changes": sign_changes(gaps),
            "lo": lo, "hi": hi, "fraction_crossing": len(crossed) / samples, "num_seeds": len(seeds)}


def _count(value: float) -> str:
    return f"{value:,.0f}"


def _sizes_text(sizes) -> str:
    return ", ".join(map(_count, sizes[:-1])) + f" and {_count(sizes[-1])}" if len(sizes) > 1 else _count(sizes[0])


def crossing_text(found: dict, labels: dict[str, str]) -> GlueText:
    """Where the two curves cross, with the interval, or that they do not cross in the range and who is ahead."""
    hard, easy = labels.get(HARD, HARD), labels.get(EASY, EASY)
    low, high = _count(found["sizes"][0]), _count(found["sizes"][-1])
    if found["point"] != found["point"]:
        ahead = hard if found["gaps"][0] > 0 else easy
        share = f"; {100 * found['fraction_crossing']:.0f} % of bootstrap resamples cross" if found["lo"] == found["lo"] else ""
        return GlueText(f"do not cross between {low} and {high} images per class: {ahead} is ahead at every size "
                        f"measured{share}")
    direction = "behind below it and ahead above it" if found["gaps"][0] < 0 else "ahead below it and behind above it"
    again = "" if found["sign_changes"] < 2 else f" (the first of {found['sign_changes']} crossings in the range)"
    return GlueText(f"cross{again} at about {_count(found['point'])} images per class (95 % bootstrap interval "
                    f"{_count(found['lo'])}–{_count(found['hi'])}; {100 * found['fraction_crossing']:.0f} % of "
                    f"resamples cross between {low} and {high}), {hard} {direction}")


def side_text(per_class: int, found: dict, labels: dict[str, str]) -> GlueText:
    """Which side of the crossing a training set of ``per_class`` images per class is on, as far as the measured
    range tells (outside it, an extrapolation, said as such)."""
    hard, easy = labels.get(HARD, HARD), labels.get(EASY, EASY)
    sizes, gaps = found["sizes"], found["gaps"]
    point, lo, hi = found["point"], found["lo"], found["hi"]
    if per_class > sizes[-1] or per_class < sizes[0]:
        edge = sizes[-1] if per_class > sizes[-1] else sizes[0]
        lead = hard if gaps[-1 if per_class > sizes[-1] else 0] > 0 else easy
        return GlueText(f"outside the range measured here ({_count(sizes[0])}–{_count(sizes[-1])}): at "
                        f"{_count(edge)}, the nearest size, {lead} is ahead; which side {_count(per_class)} images "
                        "per class are on is not measured here")
    if point != point:
        return GlueText(f"on the side where {hard if gaps[0] > 0 else easy} pays: the curves do not cross in "
                        "the range measured")
    if lo == lo and lo <= per_class <= hi:
        return GlueText("within the interval of the crossing: too close to it to tell which side")
    below = per_class < point
    lead = (easy if gaps[0] < 0 else hard) if below else (hard if gaps[0] < 0 else easy)
    return GlueText(f"{'below' if below else 'above'} the crossing, on the side where {lead} pays")


def regime_numbers(results: pd.DataFrame, labels: dict[str, str], found: dict | None = None, *,
                   reference_per_class: int = REFERENCE_PER_CLASS, paper_per_class: int = PAPER_PER_CLASS,
                   sparsity: float = 0.5) -> dict[str, GlueText]:
    """The chapter's glued numbers and sentences, each worded from its test: the crossing, keep-hard minus
    keep-easy (accuracy, class std, worst class) at the smallest and largest size, the classes each keeps most,
    and the sides of the crossing of the ``cifar10-cpu`` study and of the paper."""
    found = crossing(results, sparsity=sparsity) if found is None else found
    differences = differences_by_size(results, [(HARD, EASY)])
    hard, easy = labels.get(HARD, HARD), labels.get(EASY, EASY)
    sizes = found["sizes"]
    numbers = {"regime_sizes": GlueText(_sizes_text(sizes)),
               "regime_sparsity": GlueText(f"{100 * sparsity:.0f} %"), "regime_hard": GlueText(hard),
               "regime_easy": GlueText(easy), "regime_crossing": crossing_text(found, labels),
               "regime_seeds": GlueText(str(found["num_seeds"])),
               "regime_reference_size": GlueText(_count(reference_per_class)),
               "regime_reference_side": side_text(reference_per_class, found, labels),
               "regime_paper_size": GlueText(_count(paper_per_class)),
               "regime_paper_side": side_text(paper_per_class, found, labels)}
    for end, size in (("small", sizes[0]), ("large", sizes[-1])):
        numbers[f"regime_{end}_size"] = GlueText(_count(size))
        at_size = differences[differences["train_size"] == size]
        for measure in MEASURES:
            numbers[f"regime_{end}_{measure}"] = difference_text(_difference(at_size, HARD, EASY, measure, sparsity))
        numbers[f"regime_{end}_verdict"] = _says(
            _difference(at_size, HARD, EASY, "accuracy", sparsity), f"{easy} gives the higher accuracy",
            f"{hard} gives the higher accuracy", f"the data do not show a difference in accuracy between {hard} and {easy}")
        keep = keep_ratio_table(_at(results, size))
        for rule in (HARD, EASY):
            if (rule, sparsity) in keep.index:
                numbers[f"regime_{end}_{rule.replace('-', '_')}_keeps"] = GlueText(
                    top_keep_classes(keep.loc[(rule, sparsity)]))
    return numbers


def is_cifar10(preset: Preset) -> bool:
    """Whether the study trains on CIFAR-10 (the paper's dataset, and cifar10-cpu's), downloaded or the shared copy."""
    return preset.dataset == "cifar10" or preset.dataset.endswith("cifar10.zip")


def where_text(preset: Preset, numbers: dict[str, GlueText]) -> GlueText:
    """Where the cifar10-cpu study and the paper sit against this study's crossing; on another dataset, that their
    sizes are CIFAR-10 sizes and so not placed here."""
    if not is_cifar10(preset):
        return GlueText(f"This study is on {preset.dataset}, not CIFAR-10: the sizes of the paper "
                        f"({numbers['regime_paper_size']} images per class) and of the cifar10-cpu study "
                        f"({numbers['regime_reference_size']}) are CIFAR-10 sizes, so this chapter does not place "
                        "them; the cifar10-cpu-regime preset does.")
    return GlueText(f"The cifar10-cpu study trains on {numbers['regime_reference_size']} images per class: "
                    f"{numbers['regime_reference_side']}. The paper trains on {numbers['regime_paper_size']} per class "
                    f"(the whole CIFAR-10 training set): {numbers['regime_paper_side']}.")


def regime_table(summary: pd.DataFrame, labels: dict[str, str] | None = None) -> pd.DataFrame:
    """Size x rule: accuracy, class std and worst-class accuracy with 95 % intervals, and the worst class."""
    labels = labels or {}
    rows = [{"per class": int(row["train_size"]), "sparsity": row["sparsity"],
             "rule": labels.get(row["score"], row["score"]), "accuracy": _cell(row, "overall_accuracy"),
             "class std": _cell(row, "class_std"), "worst-class acc.": _cell(row, "worst_class_accuracy"),
             "worst class": row["worst_class"], "seeds": int(row["num_seeds"])}
            for _, row in summary.iterrows()]
    return pd.DataFrame(rows).set_index(["per class", "sparsity", "rule"])


def keep_ratios_by_size(results: pd.DataFrame, labels: dict[str, str] | None = None) -> pd.DataFrame:
    """Class keep ratios (mean over seeds) of each pruning rule at each size: one row per (per class, rule) — per
    (per class, rule, sparsity) when the records hold more than one pruned sparsity — one column per class."""
    labels = labels or {}
    frames = []
    for size in sizes_of(results):
        table = keep_ratio_table(_at(results, size)).reset_index()
        table = table[table["score"] != DENSE]
        frames.append(table.assign(**{"per class": size, "rule": table["score"].map(lambda r: labels.get(r, r))}))
    frame = pd.concat(frames, ignore_index=True)
    index = ["per class", "rule"] + (["sparsity"] if frame["sparsity"].nunique() > 1 else [])
    return frame.drop(columns=["score"] + [c for c in ["sparsity"] if c not in index]).set_index(index).round(3)


def differences_table(differences: pd.DataFrame, labels: dict[str, str] | None = None) -> pd.DataFrame:
    """:func:`~datadiet_nb.report.differences_table` with one column per training-set size."""
    table = report_differences_table(differences, labels, columns="train_size", measures=MEASURES)
    table.columns = [f"{size:,} per class" for size in table.columns]
    return table


def recipe_text(preset: Preset) -> GlueText:
    """How this study's recipe differs from the paper's, from the preset (the chapter says why)."""
    width = preset.model_options.get("width", PAPER_WIDTH)
    scoring = preset.scoring.recipe or preset.recipe
    model = (f"a ResNet-18 of first-stage width {width} (the paper's: {PAPER_WIDTH})" if preset.model == "resnet18"
             else f"the model {preset.model}")
    return GlueText(
        f"{model}, trained {preset.recipe.epochs} epochs at batch {preset.recipe.batch_size} "
        f"(the paper: {PAPER_RECIPE.epochs} at batch {PAPER_RECIPE.batch_size}); EL2N from K = "
        f"{preset.scoring.num_runs} scoring runs at epoch {preset.scoring.epoch_of('el2n')} of {scoring.epochs} "
        f"(the paper: K = {PAPER_SCORING.num_runs} at epoch {PAPER_SCORING.epoch_of('el2n')} of "
        f"{PAPER_SCORING.recipe.epochs})"
        + (", taken on the full training set" if preset.scoring.full_train else "")
        + f"; training sets of {_sizes_text(sorted(preset.train_sizes))} images per class, "
          f"{len(preset.seeds)} seeds each (the paper: {_count(PAPER_PER_CLASS)} per class on CIFAR-10)")
