"""The paper's figures, one function each: a results DataFrame (``load_results``) in, a Figure out.

Lines are means over seeds with a band of one standard deviation where there are several seeds.
The dense run (sparsity 0) starts every score's line and is drawn as a dashed reference.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from .presets import DENSE, PRUNING_SCORES
from .store import atomic_write_bytes

SCORE_LABELS = {"el2n": "EL2N", "grand": "GraNd", "random": "Random", DENSE: "Dense"}
SCORE_ORDER = list(PRUNING_SCORES)
FIGSIZE = (6.4, 4.0)
MANY_CLASSES = 20  # above this, per-class line plots get no legend


def per_run(results: pd.DataFrame) -> pd.DataFrame:
    """One row per run: score, sparsity, seed, overall accuracy and std of its class accuracies."""
    return results.drop_duplicates("key")[["score", "sparsity", "seed", "overall_accuracy", "class_std", "key"]]


def with_dense_start(frame: pd.DataFrame) -> pd.DataFrame:
    """Copy the dense rows under every pruning score, so that each score's line starts at sparsity 0."""
    dense = frame[frame["score"] == DENSE]
    scores = [s for s in SCORE_ORDER if s in set(frame["score"])]
    copies = [dense.assign(score=s) for s in scores]
    return pd.concat([frame[frame["score"] != DENSE], *copies], ignore_index=True)


def _score_lines(ax, runs: pd.DataFrame, value: str) -> None:
    data = with_dense_start(runs).assign(Score=lambda d: d["score"].map(SCORE_LABELS))
    order = [SCORE_LABELS[s] for s in SCORE_ORDER if s in set(data["score"])]
    sns.lineplot(data=data, x="sparsity", y=value, hue="Score", hue_order=order, style="Score",
                 markers=True, dashes=False, errorbar="sd", ax=ax)
    dense = runs.loc[runs["score"] == DENSE, value]
    if len(dense):
        ax.axhline(dense.mean(), color="0.4", linestyle="--", linewidth=1, label="Dense")
    ax.legend()
    ax.set_xlabel("Data sparsity (fraction of training data removed)")


def _per_score_figure(results: pd.DataFrame, value: str, ylabel: str, title: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=FIGSIZE)
    _score_lines(ax, per_run(results), value)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def accuracy_vs_sparsity(results: pd.DataFrame, title: str = "") -> plt.Figure:
    """Overall test accuracy against sparsity, one line per score (paper Figs 1-2)."""
    return _per_score_figure(results, "overall_accuracy", "Test accuracy", title or "Test accuracy vs data sparsity")


def class_std_vs_sparsity(results: pd.DataFrame, title: str = "") -> plt.Figure:
    """Standard deviation of the per-class test accuracies against sparsity (paper Fig 5)."""
    return _per_score_figure(results, "class_std", "Std of class-wise test accuracy",
                             title or "Spread of class accuracies vs data sparsity")


def _class_lines(ax, frame: pd.DataFrame, value: str, classes: list[str]) -> None:
    sns.lineplot(data=frame[frame["class"].isin(classes)], x="sparsity", y=value, hue="class",
                 hue_order=classes, marker="o", errorbar=None, ax=ax,
                 palette=sns.color_palette("tab10" if len(classes) <= 10 else "husl", len(classes)),
                 legend=len(classes) <= MANY_CLASSES)
    if len(classes) <= MANY_CLASSES:
        ax.legend(title="class", fontsize="small", ncol=2 if len(classes) > 5 else 1)
    ax.set_xlabel("Data sparsity")


def _class_order(results: pd.DataFrame) -> list[str]:
    return list(results.drop_duplicates("class").sort_values("class_index")["class"])


def _per_class_figure(results: pd.DataFrame, score: str, value: str, ylabel: str, title: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=FIGSIZE)
    _class_lines(ax, with_dense_start(results).query("score == @score"), value, _class_order(results))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def class_accuracy_vs_sparsity(results: pd.DataFrame, score: str = "el2n", title: str = "") -> plt.Figure:
    """Test accuracy of each class against sparsity for one score, one line per class (paper Fig 3)."""
    return _per_class_figure(results, score, "class_accuracy", "Class test accuracy",
                             title or f"Class-wise test accuracy, {SCORE_LABELS[score]} pruning")


def best_worst_classes(results: pd.DataFrame, score: str = "el2n", n: int = 10, title: str = "") -> plt.Figure:
    """Accuracy against sparsity of the n best and n worst classes of the dense model (paper Fig 4)."""
    dense = results[results["score"] == DENSE].groupby("class")["class_accuracy"].mean().sort_values()
    n = min(n, len(dense) // 2)
    worst, best = list(dense.index[:n]), list(dense.index[::-1][:n])
    frame = with_dense_start(results).query("score == @score")
    fig, axes = plt.subplots(1, 2, figsize=(2 * FIGSIZE[0], FIGSIZE[1]), sharey=True)
    for ax, classes, name in ((axes[0], best, "best"), (axes[1], worst, "worst")):
        _class_lines(ax, frame, "class_accuracy", classes)
        ax.set_title(f"{n} {name} classes of the dense model")
    axes[0].set_ylabel("Class test accuracy")
    fig.suptitle(title or f"Best and worst classes, {SCORE_LABELS[score]} pruning")
    fig.tight_layout()
    return fig


def keep_ratio_vs_sparsity(results: pd.DataFrame, score: str = "el2n", title: str = "") -> plt.Figure:
    """Class-wise data keep ratio against sparsity for one score, one line per class (paper Fig 6)."""
    return _per_class_figure(results, score, "keep_ratio", "Class keep ratio",
                             title or f"Class-wise data keep ratio, {SCORE_LABELS[score]} pruning")


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
    ax.set_title(f"{SCORE_LABELS[record['score']]} at sparsity {record['sparsity']:g}, seed {record['seed']}")
    ax.tick_params(axis="x", rotation=90 if len(record["classes"]) > 10 else 0)
    fig.tight_layout()
    return fig
