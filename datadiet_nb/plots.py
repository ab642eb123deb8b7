"""The paper's figures, one function each: a results DataFrame (``load_results``) in, a Figure out.

Lines are means over seeds; bands are the 95 % bootstrap intervals of :mod:`datadiet_nb.stats` (over seeds
and test images), the same numbers as the summary table. The dense run (sparsity 0) starts every score's
line and is drawn as a dashed reference. ``labels`` maps scores to their display names (``EL2N@20``).
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from .presets import DENSE, PRUNING_SCORES
from .results import class_summary, summarize
from .store import atomic_write_bytes

SCORE_LABELS = {"el2n": "EL2N", "grand": "GraNd", "random": "Random", DENSE: "Dense"}
SCORE_ORDER = list(PRUNING_SCORES)
FIGSIZE = (6.4, 4.0)
MANY_CLASSES = 20  # above this, per-class line plots get no legend
BAND_ALPHA = 0.15
SINGLE_POINT_DODGE = 0.008  # sparsity units between the error bars of groups that have one point each


def with_dense_start(frame: pd.DataFrame) -> pd.DataFrame:
    """Copy the dense rows under every pruning score, so that each score's line starts at sparsity 0."""
    dense = frame[frame["score"] == DENSE]
    scores = [s for s in SCORE_ORDER if s in set(frame["score"])]
    copies = [dense.assign(score=s) for s in scores]
    return pd.concat([frame[frame["score"] != DENSE], *copies], ignore_index=True)


def _bands(ax, frame: pd.DataFrame, group: str, value: str, order: list, names: dict, colors, *,
           x: str = "sparsity", linestyles: dict | None = None) -> None:
    """One line per ``group`` (mean, with markers) against ``x`` and its 95 % interval band (``value_lo``/
    ``value_hi``); a group with a single point gets an error bar instead, set a little apart from the others' so
    that all show."""
    single = [item for item in order if (frame[group] == item).sum() == 1]
    for item, color in zip(order, colors):
        part = frame[frame[group] == item].sort_values(x)
        if item in single:
            x_at = part[x] + SINGLE_POINT_DODGE * (single.index(item) - (len(single) - 1) / 2)
            ax.errorbar(x_at, part[value], yerr=[part[value] - part[f"{value}_lo"], part[f"{value}_hi"] - part[value]],
                        fmt="o", markersize=4, capsize=2, color=color, label=names.get(item, item))
            continue
        ax.plot(part[x], part[value], marker="o", markersize=4, color=color, label=names.get(item, item),
                linestyle=(linestyles or {}).get(item, "-"))
        ax.fill_between(part[x], part[f"{value}_lo"], part[f"{value}_hi"], color=color, alpha=BAND_ALPHA,
                        linewidth=0)


def _score_lines(ax, summary: pd.DataFrame, value: str, labels: dict[str, str]) -> None:
    frame = with_dense_start(summary)
    order = [s for s in SCORE_ORDER if s in set(frame["score"])]
    _bands(ax, frame, "score", value, order, labels, sns.color_palette(n_colors=len(order)))
    dense = summary.loc[summary["score"] == DENSE, value]
    if len(dense):
        ax.axhline(dense.mean(), color="0.4", linestyle="--", linewidth=1, label="Dense")
    ax.legend()
    ax.set_xlabel("Data sparsity (fraction of training data removed)")


def _per_score_figure(results: pd.DataFrame, value: str, ylabel: str, title: str, labels: dict | None,
                      summary: pd.DataFrame | None) -> plt.Figure:
    fig, ax = plt.subplots(figsize=FIGSIZE)
    _score_lines(ax, summarize(results) if summary is None else summary, value, {**SCORE_LABELS, **(labels or {})})
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def accuracy_vs_sparsity(results: pd.DataFrame, title: str = "", *, labels: dict | None = None,
                         summary: pd.DataFrame | None = None) -> plt.Figure:
    """Overall test accuracy against sparsity, one line per score (paper Figs 1-2)."""
    return _per_score_figure(results, "overall_accuracy", "Test accuracy", title or "Test accuracy vs data sparsity",
                             labels, summary)


def class_std_vs_sparsity(results: pd.DataFrame, title: str = "", *, corrected: bool = False,
                          labels: dict | None = None, summary: pd.DataFrame | None = None) -> plt.Figure:
    """Standard deviation of the per-class test accuracies against sparsity (paper Fig 5); ``corrected``: less
    the binomial test-set noise."""
    value = "class_std_corrected" if corrected else "class_std"
    ylabel = "Std of class-wise test accuracy" + (" (noise-corrected)" if corrected else "")
    return _per_score_figure(results, value, ylabel, title or "Spread of class accuracies vs data sparsity",
                             labels, summary)


def _class_order(results: pd.DataFrame) -> list[str]:
    return list(results.drop_duplicates("class").sort_values("class_index")["class"])


def _class_legend(ax, classes: list[str]) -> None:
    if len(classes) <= MANY_CLASSES:
        ax.legend(title="class", fontsize="small", ncol=2 if len(classes) > 5 else 1)
    ax.set_xlabel("Data sparsity")


def _palette(classes: list[str]):
    return sns.color_palette("tab10" if len(classes) <= 10 else "husl", len(classes))


def _class_accuracy_lines(ax, per_class: pd.DataFrame, score: str, classes: list[str]) -> None:
    frame = with_dense_start(per_class).query("score == @score")
    _bands(ax, frame, "class", "class_accuracy", classes, {}, _palette(classes))
    _class_legend(ax, classes)


def class_accuracy_vs_sparsity(results: pd.DataFrame, score: str = "el2n", title: str = "", *,
                               labels: dict | None = None, per_class: pd.DataFrame | None = None) -> plt.Figure:
    """Test accuracy of each class against sparsity for one score, one line (and band) per class (paper Fig 3)."""
    labels = {**SCORE_LABELS, **(labels or {})}
    fig, ax = plt.subplots(figsize=FIGSIZE)
    _class_accuracy_lines(ax, class_summary(results) if per_class is None else per_class, score, _class_order(results))
    ax.set_ylabel("Class test accuracy")
    ax.set_title(title or f"Class-wise test accuracy, {labels[score]} pruning")
    fig.tight_layout()
    return fig


def best_worst_classes(results: pd.DataFrame, ranking: pd.Series, score: str = "el2n", n: int = 10, title: str = "",
                       *, labels: dict | None = None, per_class: pd.DataFrame | None = None) -> plt.Figure:
    """Accuracy against sparsity of the n best and n worst classes (paper Fig 4), chosen by ``ranking``
    (class -> accuracy on data not used for the curves, e.g. a validation split of the training set)."""
    labels = {**SCORE_LABELS, **(labels or {})}
    ranking = ranking.sort_values()
    n = min(n, len(ranking) // 2)
    worst, best = list(ranking.index[:n]), list(ranking.index[::-1][:n])
    per_class = class_summary(results) if per_class is None else per_class
    fig, axes = plt.subplots(1, 2, figsize=(2 * FIGSIZE[0], FIGSIZE[1]), sharey=True)
    for ax, classes, name in ((axes[0], best, "best"), (axes[1], worst, "worst")):
        _class_accuracy_lines(ax, per_class, score, classes)
        ax.set_title(f"{n} {name} classes on the validation split")
    axes[0].set_ylabel("Class test accuracy")
    fig.suptitle(title or f"Best and worst classes, {labels[score]} pruning")
    fig.tight_layout()
    return fig


def keep_ratio_vs_sparsity(results: pd.DataFrame, score: str = "el2n", title: str = "", *,
                           labels: dict | None = None) -> plt.Figure:
    """Class-wise data keep ratio against sparsity for one score, one line per class (paper Fig 6); bands:
    the spread over seeds (none for a score, whose kept set is the same for every seed)."""
    labels = {**SCORE_LABELS, **(labels or {})}
    classes = _class_order(results)
    fig, ax = plt.subplots(figsize=FIGSIZE)
    sns.lineplot(data=with_dense_start(results).query("score == @score"), x="sparsity", y="keep_ratio", hue="class",
                 hue_order=classes, marker="o", errorbar=("pi", 100), ax=ax, palette=_palette(classes),
                 legend=len(classes) <= MANY_CLASSES)
    _class_legend(ax, classes)
    ax.set_ylabel("Class keep ratio")
    ax.set_title(title or f"Class-wise data keep ratio, {labels[score]} pruning")
    fig.tight_layout()
    return fig


def keep_ratio_by_epoch(frame: pd.DataFrame, sparsity: float, label: str = "EL2N") -> plt.Figure:
    """Class keep ratio at ``sparsity`` against the scoring epoch (``stability.keep_ratio_by_epoch``), with the
    95 % t-interval over scoring runs as a band."""
    classes = list(frame.sort_values("keep_ratio", ascending=False).drop_duplicates("class")["class"])
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for name, color in zip(classes, _palette(classes)):
        part = frame[frame["class"] == name].sort_values("epoch")
        ax.plot(part["epoch"], part["run_mean"], marker="o", markersize=4, color=color, label=name)
        ax.fill_between(part["epoch"], part["run_lo"].clip(0, 1), part["run_hi"].clip(0, 1), color=color,
                        alpha=BAND_ALPHA, linewidth=0)
    _class_legend(ax, classes)
    ax.set_xlabel("Scoring epoch")
    ax.set_ylabel("Class keep ratio")
    ax.set_title(f"{label} keep ratio at sparsity {sparsity:g} by scoring epoch")
    fig.tight_layout()
    return fig


def agreement_curve(frame: pd.DataFrame, label: str) -> plt.Figure:
    """Spearman between the mean of k scoring runs and the K-run mean, against k (``stability.agreement_curve``)."""
    fig, ax = plt.subplots(figsize=FIGSIZE)
    ax.plot(frame["k"], frame["spearman"], marker="o", label=label)
    ax.fill_between(frame["k"], frame["min"], frame["max"], alpha=BAND_ALPHA, linewidth=0)
    ax.set_xlabel("Scoring runs averaged (k)")
    ax.set_ylabel("Spearman with the K-run mean")
    ax.legend()
    fig.tight_layout()
    return fig


BIAS_MEASURES = {  # summary column -> panel title, for the bias chapter
    "overall_accuracy": "Test accuracy", "class_std": "Std of class accuracies",
    "worst_class_accuracy": "Worst-class accuracy", "class_gap": "Max - min class accuracy",
    "class_cv": "Coefficient of variation", "worst_10pct_accuracy": "Mean of the worst 10 % of classes",
    "mean_abs_change": "Mean |change| of class accuracy vs dense",
    "keep_error_spearman": "Rank corr. of keep ratio with dense error",
}
PANEL_SIZE = (3.6, 2.8)


def shown_bias_measures(summary: pd.DataFrame) -> dict[str, str]:
    """:data:`BIAS_MEASURES` less the mean of the worst 10 % of classes where it is the worst class itself (fewer
    than 20 classes: the worst 10 % is one class), so no table or figure shows one measure twice."""
    same = np.allclose(summary["worst_10pct_accuracy"], summary["worst_class_accuracy"], equal_nan=True)
    return {name: title for name, title in BIAS_MEASURES.items() if not (same and name == "worst_10pct_accuracy")}


def _rule_colors(rules: list[str]) -> dict[str, tuple]:
    return dict(zip(rules, sns.color_palette("tab20" if len(rules) > 10 else "tab10", len(rules))))


def bias_panels(summary: pd.DataFrame, *, labels: dict | None = None, columns: int = 4) -> plt.Figure:
    """One small panel per bias measure against sparsity, every rule a line with its 95 % band (dense: dashed)."""
    names = {**SCORE_LABELS, **(labels or {})}
    rules = [s for s in SCORE_ORDER if s in set(summary["score"])]
    colors = _rule_colors(rules)
    measures = shown_bias_measures(summary)
    rows = -(-len(measures) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows), sharex=True)
    for ax, (value, title) in zip(axes.flat, measures.items()):
        relative = value in ("mean_abs_change", "keep_error_spearman")  # undefined for the dense run itself
        frame = summary[summary["score"] != DENSE] if relative else with_dense_start(summary)
        _bands(ax, frame, "score", value, rules, names, [colors[r] for r in rules])
        dense = summary.loc[summary["score"] == DENSE, value]
        if len(dense) and not relative:
            ax.axhline(dense.mean(), color="0.4", linestyle="--", linewidth=1)
        ax.set_title(title, fontsize=9)
    for ax in axes.flat[len(measures):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("Data sparsity")
    handles, texts = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, texts, loc="lower center", ncol=min(6, len(texts)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


REGIME_MEASURES = {"overall_accuracy": "Test accuracy", "class_std": "Std of class accuracies",
                   "worst_class_accuracy": "Worst-class accuracy"}  # summary column -> panel title


def regime_panels(summary: pd.DataFrame, *, labels: dict | None = None) -> plt.Figure:
    """Accuracy, class std and worst-class accuracy against training-set size (per class, log scale): one line per
    rule at its sparsity with its 95 % band, the dense run of each size dashed (:func:`.regime.summary_by_size`)."""
    names = {**SCORE_LABELS, **(labels or {})}
    rules = [s for s in SCORE_ORDER if s in set(summary["score"])]
    colors = _rule_colors(rules)
    order = [*rules, DENSE] if DENSE in set(summary["score"]) else rules
    fig, axes = plt.subplots(1, len(REGIME_MEASURES), figsize=(PANEL_SIZE[0] * len(REGIME_MEASURES), PANEL_SIZE[1] + 0.4))
    for ax, (value, title) in zip(axes, REGIME_MEASURES.items()):
        _bands(ax, summary, "score", value, order, names, [colors.get(r, (0.4, 0.4, 0.4)) for r in order],
               x="train_size", linestyles={DENSE: "--"})
        ax.set_xscale("log")
        ax.set_xticks(sorted(summary["train_size"].unique()), [f"{n:,.0f}" for n in sorted(summary["train_size"].unique())])
        ax.minorticks_off()
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("Training images per class (before pruning)")
    handles, texts = axes[0].get_legend_handles_labels()
    fig.legend(handles, texts, loc="lower center", ncol=min(6, len(texts)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def keep_ratio_vs_dense_error(results: pd.DataFrame, summary: pd.DataFrame, sparsity: float, *,
                              labels: dict | None = None, columns: int = 4) -> plt.Figure:
    """At one sparsity, each rule's class keep ratio against the dense model's class error (means over seeds),
    one panel per rule, titled with the rank correlation and its 95 % interval."""
    names = {**SCORE_LABELS, **(labels or {})}
    dense = results[results["score"] == DENSE].groupby("class")["class_accuracy"].mean()
    at = results[(results["sparsity"] == sparsity) & (results["score"] != DENSE)]
    rules = [s for s in SCORE_ORDER if s in set(at["score"])]
    rows = max(1, -(-len(rules) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows), sharex=True,
                             sharey=True, squeeze=False)
    colors = _rule_colors(rules)
    for ax, rule in zip(axes.flat, rules):
        keep = at[at["score"] == rule].groupby("class")["keep_ratio"].mean()
        ax.scatter(1 - dense.reindex(keep.index), keep, s=14, color=colors[rule])
        row = summary[(summary["score"] == rule) & (summary["sparsity"] == sparsity)].iloc[0]
        rho = row["keep_error_spearman"]
        ax.set_title(f"{names.get(rule, rule)}: " + (
            "rho undefined (keep ratios flat)" if rho != rho else
            f"rho {rho:.2f} [{row['keep_error_spearman_lo']:.2f}, {row['keep_error_spearman_hi']:.2f}]"), fontsize=8)
    for ax in axes.flat[len(rules):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("Dense class error")
    for ax in axes[:, 0]:
        ax.set_ylabel("Class keep ratio")
    fig.tight_layout()
    return fig


def save(fig: plt.Figure, path_stem: str | Path) -> list[Path]:
    """Save as PNG and SVG next to each other; returns the paths."""
    stem = Path(path_stem)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    for path, options in zip(paths, ({"dpi": 150}, {})):
        buffer = io.BytesIO()
        fig.savefig(buffer, format=path.suffix[1:], **options)
        atomic_write_bytes(path, buffer.getvalue())
    return paths


def score_distributions(scores: dict, labels, classes) -> plt.Figure:
    """Per-class distributions of EL2N and GraNd (means over the scoring runs), one box per class."""
    frame = pd.concat([pd.DataFrame({"score": scores[name], "class": [classes[i] for i in labels],
                                     "kind": SCORE_LABELS[name]}) for name in ("el2n", "grand")])
    fig, axes = plt.subplots(1, 2, figsize=(2 * FIGSIZE[0], FIGSIZE[1]))
    for ax, kind in zip(axes, ("EL2N", "GraNd")):
        sns.boxplot(data=frame[frame["kind"] == kind], x="class", y="score", ax=ax, fliersize=1, color="C0")
        ax.set_title(f"{kind} per class")
        ax.tick_params(axis="x", rotation=90 if len(classes) > 10 else 0)
    fig.tight_layout()
    return fig


def run_classes(record: dict) -> plt.Figure:
    """One run: test accuracy and keep ratio of each class, side by side."""
    frame = pd.DataFrame({"class": record["classes"], "Test accuracy": record["class_accuracy"],
                          "Keep ratio": record["keep_ratio"]}).melt("class", var_name="measure")
    fig, ax = plt.subplots(figsize=FIGSIZE)
    sns.barplot(data=frame, x="class", y="value", hue="measure", ax=ax)
    ax.set_title(f"{SCORE_LABELS.get(record['score'], record['score'])} at sparsity {record['sparsity']:g}, seed {record['seed']}")
    ax.tick_params(axis="x", rotation=90 if len(record["classes"]) > 10 else 0)
    fig.tight_layout()
    return fig
