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


def _nonzero(sizes: np.ndarray, gaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sizes and gaps in size order (a gap of exactly zero is a tie, not a side)."""
    order = np.argsort(sizes)
    return sizes[order], gaps[order]


def crossing_bracket(sizes, gaps) -> tuple[float, float]:
    """The two measured sizes between which a gap first changes sign, from the smallest size on; a gap of exactly
    zero is a tie, on neither side, so a gap that touches zero and comes back has not crossed. (NaN, NaN) if the
    sign never changes."""
    sizes, gaps = _nonzero(np.asarray(sizes, dtype=np.float64), np.asarray(gaps, dtype=np.float64))
    sided = np.flatnonzero(gaps != 0)
    for before, after in zip(sided[:-1], sided[1:]):
        if gaps[before] * gaps[after] < 0:
            return float(sizes[before]), float(sizes[after])
    return float("nan"), float("nan")


def crossing_point(sizes, gaps, *, log: bool = True) -> float:
    """Where a gap first changes sign (:func:`crossing_bracket`), interpolated linearly in log size (``log``) or in
    size between the two sizes that bracket it; where the gap is exactly zero at sizes in between, the (geometric)
    middle of those sizes. NaN if the sign never changes."""
    sizes, gaps = _nonzero(np.asarray(sizes, dtype=np.float64), np.asarray(gaps, dtype=np.float64))
    low, high = crossing_bracket(sizes, gaps)
    if low != low:
        return float("nan")
    i, j = int(np.flatnonzero(sizes == low)[0]), int(np.flatnonzero(sizes == high)[0])
    if j > i + 1:  # measured ties in between: the curves meet there
        return float(np.exp(np.log(sizes[i + 1:j]).mean())) if log else float(sizes[i + 1:j].mean())
    x = np.log(sizes) if log else sizes
    point = x[i] + (x[j] - x[i]) * gaps[i] / (gaps[i] - gaps[j])
    return float(np.exp(point) if log else point)


def sign_changes(gaps) -> int:
    """How many times a gap changes sign from one size to the next, ties (a gap of exactly zero) skipped."""
    signs = np.sign(np.asarray(gaps, dtype=np.float64))
    signs = signs[signs != 0]
    return int((np.diff(signs) != 0).sum())


def _resample_crossing(sizes: list[int], gaps: np.ndarray, above_sign: float) -> float:
    """One bootstrap resample's crossing: its :func:`crossing_point`; where it does not cross in the range, -inf
    if every size is on the side the observed curves reach above their crossing (it would cross below the range),
    +inf if every size is on the side below it (above the range), NaN if it is tied at every size."""
    point = crossing_point(sizes, gaps)
    if point == point:
        return point
    signs = set(np.sign(gaps[gaps != 0]))
    if not signs:
        return float("nan")
    return -np.inf if signs == {above_sign} else np.inf


def _hits(results: pd.DataFrame, size: int, rule: str, sparsity: float, seeds: list) -> list[np.ndarray]:
    runs = _at(results, size)
    runs = runs[(runs["score"] == rule) & np.isclose(runs["sparsity"], sparsity) & runs["seed"].isin(seeds)]
    return _correct(runs.sort_values(["seed", "class_index"]))


def crossing(results: pd.DataFrame, *, hard: str = HARD, easy: str = EASY, sparsity: float = 0.5,
             samples: int = stats.BOOTSTRAP_SAMPLES, seed: int = stats.BOOTSTRAP_SEED) -> dict:
    """Where the accuracy of ``hard`` minus that of ``easy`` (runs of one seed paired) changes sign across sizes.

    Returns the sizes, the gap at each (mean over the seeds both ran), the two measured sizes that bracket the
    first crossing (``bracket``), the crossing interpolated linearly in log size (``point``, NaN if none) and in
    size (``point_linear``), and a 95 % bootstrap interval (``lo``, ``hi``) over every resample (test images drawn
    with replacement within each class, the same draw for every run, then the seeds): a resample that does not
    cross in the range counts as crossing beyond the end its gaps point to (-inf or +inf, an open end when more
    than 2.5 % of resamples fall there), one tied at every size as either end (the interval is conservative);
    ``fraction_crossing`` is the share that cross within the range.
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
    gaps = observed.mean(1)
    point = crossing_point(sizes, gaps)
    found = {"sizes": sizes, "gaps": gaps, "point": point, "point_linear": crossing_point(sizes, gaps, log=False),
             "bracket": crossing_bracket(sizes, gaps), "sign_changes": sign_changes(gaps),
             "lo": float("nan"), "hi": float("nan"), "num_seeds": len(seeds)}
    first_sided = gaps[np.flatnonzero(gaps != 0)[:1]]
    above_sign = -float(np.sign(first_sided[0])) if len(first_sided) else 1.0  # the observed side above a crossing
    points = np.array([_resample_crossing(sizes, gap, above_sign) for gap in boot])
    found["fraction_crossing"] = float(np.isfinite(points).sum() / samples)
    if point == point:  # a resample tied at every size could cross anywhere: the bounds count it as either end
        tail = 100 * (1 - stats.CONFIDENCE) / 2
        found["lo"] = float(np.percentile(np.where(np.isnan(points), -np.inf, points), tail, method="lower"))
        found["hi"] = float(np.percentile(np.where(np.isnan(points), np.inf, points), 100 - tail, method="higher"))
    return found


def _count(value: float) -> str:
    return f"{value:,.0f}"


def _sizes_text(sizes) -> str:
    return ", ".join(map(_count, sizes[:-1])) + f" and {_count(sizes[-1])}" if len(sizes) > 1 else _count(sizes[0])


def _interval_text(found: dict) -> str:
    """``95 % bootstrap interval 21–27`` with an open end where resamples do not cross within the range."""
    low, high = _count(found["sizes"][0]), _count(found["sizes"][-1])
    lo = f"below {low}" if found["lo"] == -np.inf else _count(found["lo"])
    hi = f"above {high}" if found["hi"] == np.inf else _count(found["hi"])
    return f"95 % bootstrap interval {lo} to {hi}"


def crossing_text(found: dict, labels: dict[str, str]) -> GlueText:
    """Where the two curves cross: between which measured sizes, where interpolation puts it (in log size and in
    size), with the bootstrap interval (open where resamples do not cross in the range); or that they do not
    cross in the range and who is ahead."""
    hard, easy = labels.get(HARD, HARD), labels.get(EASY, EASY)
    low, high = _count(found["sizes"][0]), _count(found["sizes"][-1])
    share = f"{100 * found['fraction_crossing']:.0f} % of bootstrap resamples cross between {low} and {high}"
    if found["point"] != found["point"]:
        sided = found["gaps"][found["gaps"] != 0]
        if not len(sided):
            return GlueText(f"are tied at every size measured ({low} to {high} images per class)")
        ahead = hard if sided[0] > 0 else easy
        return GlueText(f"do not cross between {low} and {high} images per class: {ahead} is ahead at every size "
                        f"measured where they differ; {share}")
    first_sided = found["gaps"][found["gaps"] != 0][0]
    direction = "behind below it and ahead above it" if first_sided < 0 else "ahead below it and behind above it"
    again = "" if found["sign_changes"] < 2 else f" (the first of {found['sign_changes']} crossings in the range)"
    below, above = found["bracket"]
    return GlueText(f"cross{again} between the measured sizes {_count(below)} and {_count(above)} images per "
                    f"class, at about {_count(found['point'])} interpolated in log size ({_count(found['point_linear'])} "
                    f"in size; {_interval_text(found)}; {share}), {hard} {direction}")


def side_text(per_class: int, found: dict, labels: dict[str, str]) -> GlueText:
    """Which side of the crossing a training set of ``per_class`` images per class is on, as far as the measured
    range tells (outside it, an extrapolation, said as such)."""
    hard, easy = labels.get(HARD, HARD), labels.get(EASY, EASY)
    sizes, gaps = found["sizes"], np.asarray(found["gaps"])
    point, lo, hi = found["point"], found["lo"], found["hi"]
    sided = gaps[gaps != 0]
    if per_class > sizes[-1] or per_class < sizes[0]:
        edge = sizes[-1] if per_class > sizes[-1] else sizes[0]
        gap = gaps[-1 if per_class > sizes[-1] else 0]
        lead = f"{hard} is ahead" if gap > 0 else f"{easy} is ahead" if gap < 0 else "the two are tied"
        return GlueText(f"outside the range measured here ({_count(sizes[0])}–{_count(sizes[-1])}): at "
                        f"{_count(edge)}, the nearest size, {lead}; which side {_count(per_class)} images "
                        "per class are on is not measured here")
    if point != point:
        if not len(sided):
            return GlueText("on neither side: the two are tied at every size measured")
        return GlueText(f"on the side where {hard if sided[0] > 0 else easy} pays: the curves do not cross in "
                        "the range measured")
    if lo <= per_class <= hi:
        return GlueText("within the interval of the crossing: too close to it to tell which side")
    below = per_class < point
    lead = (easy if sided[0] < 0 else hard) if below else (hard if sided[0] < 0 else easy)
    return GlueText(f"{'below' if below else 'above'} the crossing, on the side where {lead} pays")


def regime_numbers(results: pd.DataFrame, labels: dict[str, str], found: dict | None = None, *,
                   differences: pd.DataFrame | None = None, reference_per_class: int = REFERENCE_PER_CLASS,
                   paper_per_class: int = PAPER_PER_CLASS, sparsity: float = 0.5) -> dict[str, GlueText]:
    """The chapter's glued numbers and sentences, each worded from its test (``differences``: the chapter's table
    of :func:`differences_by_size`, whose Holm adjustment the verdicts read; by default that of
    :func:`regime_pairs` of the rules in the records): the crossing, keep-hard minus keep-easy (accuracy, class
    std, worst class) at the smallest and largest size, the classes each keeps most, the sizes where a rule keeps
    no image of a class, the sizes where random pruning beats both, and the sides of the crossing of the
    ``cifar10-cpu`` study and of the paper."""
    found = crossing(results, sparsity=sparsity) if found is None else found
    if differences is None:
        differences = differences_by_size(results, regime_pairs(list(dict.fromkeys(results["score"]))))
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
    numbers["regime_deleted"] = deleted_text(deleted_classes(results, sparsity), labels)
    numbers["regime_random_ahead"] = random_ahead_text(differences, sizes, labels, sparsity)
    return numbers


def deleted_classes(results: pd.DataFrame, sparsity: float) -> pd.DataFrame:
    """Where a pruning rule keeps no training image of a class: one row per (train_size, rule, class) with the
    seeds in which it did (``seeds``) of how many ran (``of_seeds``)."""
    pruned = results[np.isclose(results["sparsity"], sparsity) & (results["score"] != DENSE)]
    rows = []
    for (size, rule, name), group in pruned.groupby(["train_size", "score", "class"], sort=False):
        emptied = group.loc[group["keep_ratio"] == 0, "seed"]
        if len(emptied):
            rows.append({"train_size": int(round(size)), "rule": rule, "class": name, "seeds": len(emptied),
                         "of_seeds": group["seed"].nunique()})
    return pd.DataFrame(rows, columns=["train_size", "rule", "class", "seeds", "of_seeds"])


def deleted_text(deleted: pd.DataFrame, labels: dict[str, str]) -> GlueText:
    """The sizes at which a rule deletes a class (keeps none of its training images), or that none does."""
    if deleted.empty:
        return GlueText("No rule deletes a class (keeps none of its training images) at any size.")
    parts = []
    for (size, rule), group in deleted.groupby(["train_size", "rule"], sort=True):
        classes = ", ".join(f"{name} (in {seeds} of {of} seeds)" for name, seeds, of in
                            zip(group["class"], group["seeds"], group["of_seeds"]))
        parts.append(f"with {_count(size)} images per class, {labels.get(rule, rule)} keeps no training image of "
                     f"class {classes}")
    return GlueText("Deleted classes: " + "; ".join(parts) + ". There, the comparison is as much about which "
                    "classes are left as about which examples.")


def random_ahead_text(differences: pd.DataFrame, sizes: list[int], labels: dict[str, str], sparsity: float
                      ) -> GlueText:
    """The sizes at which random pruning has a higher accuracy than both keep-hard and keep-easy (each by its
    adjusted paired test), or that it has at none."""
    ahead = []
    for size in sizes:
        at_size = differences[differences["train_size"] == size]
        verdicts = [_says(_difference(at_size, rule, "random", "accuracy", sparsity), "behind", "ahead", "")
                    for rule in (HARD, EASY)]
        if verdicts == ["behind", "behind"]:
            ahead.append(size)
    hard, easy = labels.get(HARD, HARD), labels.get(EASY, EASY)
    if not ahead:
        return GlueText(f"At no size measured is random pruning shown to beat both {hard} and {easy}.")
    return GlueText(f"With {_sizes_text(ahead)} images per class, random pruning beats both {hard} and {easy} "
                    "(adjusted paired tests): there, neither way of ranking by score pays.")


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
    several = frame["sparsity"].nunique() > 1
    index = ["per class", "rule", "sparsity"] if several else ["per class", "rule"]
    dropped = ["score"] if several else ["score", "sparsity"]
    return frame.drop(columns=dropped).set_index(index).round(3)


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
