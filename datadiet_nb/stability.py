"""How stable the scores are: agreement between scoring runs, with the number of runs K, between EL2N
and GraNd, GraNd at initialisation against the input norm, and the class keep ratio by scoring epoch; and how
any two score sets of one training set agree as pruning rules (:func:`compare`).

A single early checkpoint mostly reflects that checkpoint's transient class errors; these measures show
how much of a ranking is signal. They read scores, they never change them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from . import stats
from .prune import class_keep_ratio, select_indices
from .scores import SCORES, grand_scores

AGREEMENT_DRAWS = 20  # random subsets of k runs averaged per point of the K-vs-agreement curve
AGREEMENT_SEED = 0


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(spearmanr(a, b).statistic)


def mean_pairwise_spearman(runs: np.ndarray) -> float:
    """Mean Spearman correlation over all pairs of scoring runs ([K, N]); NaN for one run."""
    pairs = [spearman(a, b) for a, b in itertools.combinations(runs, 2)]
    return float(np.mean(pairs)) if pairs else float("nan")


def agreement_curve(runs: np.ndarray, *, draws: int = AGREEMENT_DRAWS, seed: int = AGREEMENT_SEED) -> pd.DataFrame:
    """Spearman between the K-run mean and the mean of k < K runs (averaged over random subsets of k), per k.

    It rises towards 1 as k grows; how fast says how many scoring runs a stable ranking needs.
    """
    rng = np.random.default_rng(seed)
    k_all, full = len(runs), runs.mean(0)
    rows = []
    for k in range(1, k_all):
        subsets = {tuple(sorted(rng.choice(k_all, size=k, replace=False))) for _ in range(draws)}
        values = [spearman(runs[list(s)].mean(0), full) for s in subsets]
        rows.append({"k": k, "spearman": float(np.mean(values)), "min": float(np.min(values)),
                     "max": float(np.max(values))})
    return pd.DataFrame(rows, columns=["k", "spearman", "min", "max"])


def keep_ratio_over_runs(runs: np.ndarray, labels: np.ndarray, sparsity: float, classes: list[str]) -> pd.DataFrame:
    """Per class: the keep ratio at ``sparsity`` of each scoring run's own scores, their mean and 95 % t-interval
    over the K runs, and the keep ratio of the K-run mean score (what the study prunes with)."""
    per_run = np.array([class_keep_ratio(labels, select_indices(r, sparsity), len(classes)) for r in runs])
    pooled = class_keep_ratio(labels, select_indices(runs.mean(0), sparsity), len(classes))
    rows = []
    for c, name in enumerate(classes):
        mean, lo, hi = stats.t_interval(per_run[:, c], bounds=(0.0, 1.0))  # a keep ratio is in [0, 1]
        rows.append({"class": name, "keep_ratio": float(pooled[c]), "run_mean": mean, "run_lo": lo, "run_hi": hi,
                     "run_min": float(per_run[:, c].min()), "run_max": float(per_run[:, c].max())})
    return pd.DataFrame(rows).sort_values("keep_ratio", ascending=False, ignore_index=True)


def trajectory(scores: dict[str, np.ndarray], score_epoch: int) -> dict[int, np.ndarray]:
    """EL2N of every scoring run by epoch ([K, N] each): the trajectory epochs and the score's own epoch."""
    by_epoch = {int(name[len("el2n_at"):-len("_runs")]): runs for name, runs in scores.items()
                if name.startswith("el2n_at") and name.endswith("_runs")}
    by_epoch[score_epoch] = scores["el2n_runs"]
    return dict(sorted(by_epoch.items()))


def keep_ratio_by_epoch(scores: dict[str, np.ndarray], score_epoch: int, labels: np.ndarray, sparsity: float,
                        classes: list[str]) -> pd.DataFrame:
    """Class keep ratio of EL2N at ``sparsity`` for each scoring epoch: mean over runs with a 95 % t-interval."""
    frames = []
    for epoch, runs in trajectory(scores, score_epoch).items():
        frame = keep_ratio_over_runs(runs, labels, sparsity, classes)
        frames.append(frame.assign(epoch=epoch))
    return pd.concat(frames, ignore_index=True)


def agreement_table(scores: dict[str, np.ndarray], labels: dict[str, str]) -> pd.DataFrame:
    """Spearman agreement: between the K runs of each score (mean over pairs), and EL2N vs GraNd (K-run means)."""
    rows = [{"comparison": f"{labels[name]}: run vs run (mean over pairs)",
             "spearman": mean_pairwise_spearman(scores[f"{name}_runs"])} for name in ("el2n", "grand")]
    rows.append({"comparison": f"{labels['el2n']} vs {labels['grand']} (K-run means)",
                 "spearman": spearman(scores["el2n"], scores["grand"])})
    return pd.DataFrame(rows).set_index("comparison")


def grand_at_init_vs_input_norm(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Spearman between GraNd of an untrained model and the norm of each (normalised) input.

    At initialisation the logits barely depend on the label, so GraNd mostly follows how large the input
    is; a high value here says GraNd@0 ranks inputs by size, not by difficulty.
    """
    norms = inputs.flatten(1).norm(dim=1).numpy()
    return spearman(grand_scores(model, inputs, targets).numpy(), norms)


def rank_agreement(scores: dict[str, "np.ndarray"]) -> dict[str, float]:
    """Spearman rank correlations: EL2N vs GraNd (means over runs), and the mean between pairs of runs."""
    agreement = {"el2n_vs_grand": spearman(scores["el2n"], scores["grand"])}
    for name in SCORES:
        agreement[f"{name}_across_runs"] = mean_pairwise_spearman(scores[f"{name}_runs"])
    return agreement


# --- agreement between two score sets on the same data (e.g. this package's EL2N and another implementation's) ---

REVERSED_SPEARMAN = -0.5  # below this, one score set ranks the other's hardest as easiest
INPUT_NORM_SPEARMAN = 0.8  # above this, a score ranks examples by the size of their input


@dataclass
class Agreement:
    """How two score sets of one training set agree: ``summary`` (one row per measure), ``per_class`` (Spearman
    within each class and both keep ratios at each sparsity), ``overlap`` (top-k overlap and keep-ratio rank
    correlation per sparsity), and ``warnings`` for the known traps."""

    summary: pd.DataFrame
    per_class: pd.DataFrame
    overlap: pd.DataFrame
    warnings: list[str]


def compare(a: np.ndarray, b: np.ndarray, labels: np.ndarray, classes: list[str], sparsities, *,
            names: tuple[str, str] = ("a", "b"), input_norm: np.ndarray | None = None) -> Agreement:
    """Compare score sets ``a`` and ``b`` (one value per training example, the same order) as pruning rules that
    keep the highest scores: Spearman overall and within each class, the overlap of the kept sets at each
    sparsity (against chance, (1 - s)), the class keep ratios side by side and their rank correlation; warnings
    when ``b`` ranks in reverse or (with ``input_norm``, e.g. of GraNd at initialisation) follows the input norm."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if a.shape != b.shape or a.shape != labels.shape:
        raise ValueError(f"score sets and labels must have one value per example: {a.shape}, {b.shape}, {labels.shape}")
    overall = spearman(a, b)
    within = [spearman(a[labels == c], b[labels == c]) if (labels == c).sum() > 2 else float("nan")
              for c in range(len(classes))]
    per_class = pd.DataFrame({"class": classes, "spearman": within})
    rows = []
    for sparsity in (s for s in sparsities if s > 0):
        kept_a, kept_b = select_indices(a, sparsity), select_indices(b, sparsity)
        ratio_a = class_keep_ratio(labels, kept_a, len(classes))
        ratio_b = class_keep_ratio(labels, kept_b, len(classes))
        per_class[f"keep_{names[0]}_{sparsity:g}"] = ratio_a
        per_class[f"keep_{names[1]}_{sparsity:g}"] = ratio_b
        same = np.allclose(ratio_a, ratio_b)
        rows.append({"sparsity": sparsity, "kept": len(kept_a),
                     "overlap": len(np.intersect1d(kept_a, kept_b)) / max(1, len(kept_a)), "chance": 1.0 - sparsity,
                     "keep_ratio_spearman": 1.0 if same else spearman(ratio_a, ratio_b)})
    overlap = pd.DataFrame(rows, columns=["sparsity", "kept", "overlap", "chance", "keep_ratio_spearman"])
    summary = pd.DataFrame([
        {"measure": "Spearman, all examples", "value": overall},
        {"measure": "Spearman within class (mean over classes)", "value": float(np.nanmean(within))},
        *({"measure": f"top-k overlap at s = {row['sparsity']:g} (chance {row['chance']:.2f})",
           "value": row["overlap"]} for _, row in overlap.iterrows()),
    ]).set_index("measure")
    warnings = []
    if overall <= REVERSED_SPEARMAN:
        warnings.append(f"{names[1]} ranks in reverse of {names[0]} (Spearman {overall:.2f}): one of them keeps the "
                        "easiest examples, or its sign is flipped")
    if input_norm is not None:
        rho = spearman(b, np.asarray(input_norm, dtype=np.float64))
        if rho >= INPUT_NORM_SPEARMAN:
            warnings.append(f"{names[1]} follows the input norm (Spearman {rho:.2f}): a GraNd at initialisation ranks "
                            "inputs by their size, not by their difficulty")
    return Agreement(summary, per_class, overlap, warnings)
