"""How stable the scores are: agreement between scoring runs, with the number of runs K, between EL2N
and GraNd, GraNd at initialisation against the input norm, and the class keep ratio by scoring epoch.

A single early checkpoint mostly reflects that checkpoint's transient class errors; these measures show
how much of a ranking is signal. They read scores, they never change them.
"""

from __future__ import annotations

import itertools

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
        mean, lo, hi = stats.t_interval(per_run[:, c])
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
