"""Hand computations the tests compare the package's numbers with."""

from pathlib import Path

import numpy as np


def records_in(store: Path) -> list[dict]:
    """Every run record of a store, read straight from its JSON files."""
    import json
    return [json.loads(p.read_text()) for p in sorted((Path(store) / "runs").glob("*.json"))]


def hand_summary(records: list[dict]) -> dict[tuple[str, float], dict]:
    """Per (score, sparsity), computed by hand from the records' test predictions: the mean over seeds of the
    overall accuracy, std of class accuracies (population) and worst class accuracy; the most frequent worst
    class; the seed count; the one-sided paired t-test p-value (against the dense run of the same seed) that
    the std is lower; and the mean keep ratio of every class."""
    from collections import Counter

    from scipy.stats import ttest_rel

    per_run = {}
    for r in records:
        predictions, labels = np.array(r["predictions"]), np.array(r["test_labels"])
        accuracy = np.array([(predictions[labels == c] == c).mean() for c in range(len(r["classes"]))])
        per_run[(r["score"], r["sparsity"], r["seed"])] = {
            "overall": (predictions == labels).mean(), "std": accuracy.std(), "worst": accuracy.min(),
            "worst_class": r["classes"][int(accuracy.argmin())], "keep_ratio": np.array(r["keep_ratio"])}
    table = {}
    for score, sparsity in {(s, p) for s, p, _ in per_run}:
        seeds = sorted(seed for s, p, seed in per_run if (s, p) == (score, sparsity))
        runs = [per_run[(score, sparsity, seed)] for seed in seeds]
        worst = Counter(run["worst_class"] for run in runs)
        p = float("nan")
        if score != "dense" and len(seeds) >= 2:
            pruned = [run["std"] for run in runs]
            dense = [per_run[("dense", 0.0, seed)]["std"] for seed in seeds]
            p = ttest_rel(pruned, dense, alternative="less").pvalue
        table[(score, sparsity)] = {
            "overall_accuracy": np.mean([run["overall"] for run in runs]),
            "class_std": np.mean([run["std"] for run in runs]),
            "worst_class_accuracy": np.mean([run["worst"] for run in runs]),
            "worst_class": min(worst, key=lambda name: (-worst[name], name)), "num_seeds": len(seeds),
            "std_below_dense_p": p, "keep_ratio": np.mean([run["keep_ratio"] for run in runs], axis=0)}
    return table
