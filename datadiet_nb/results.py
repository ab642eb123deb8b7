"""Run records of a store as one tidy pandas DataFrame, and the per-(score, sparsity) summary table."""

from __future__ import annotations

import os
from typing import Iterable

import numpy as np
import pandas as pd

from .store import Store

CONFIG_COLUMNS = ["preset", "dataset", "model", "score", "sparsity", "offset", "seed"]


def load_results(store: str | os.PathLike | Store, keys: Iterable[str] | None = None) -> pd.DataFrame:
    """One row per (run, class): the run's config columns, ``class``, ``class_accuracy``, ``keep_ratio``,
    ``overall_accuracy``, plus ``class_index``, ``class_std`` (std of the run's class accuracies) and ``key``.

    ``keys`` restricts the table to those runs (e.g. the records a sweep returned)."""
    store = store if isinstance(store, Store) else Store(store)
    records = store.records() if keys is None else (store.load_run(k) for k in dict.fromkeys(keys))
    rows = []
    for record in filter(None, records):  # a record found corrupt is moved aside and left out
        run = {"preset": record["preset"], "dataset": record["dataset"]["name"], "model": record["model"],
               "score": record["score"], "sparsity": record["sparsity"], "offset": record["offset"],
               "seed": record["seed"], "overall_accuracy": record["overall_accuracy"],
               "class_std": record["bias"]["std"], "key": record["key"]}
        for index, name in enumerate(record["classes"]):
            rows.append({**run, "class": name, "class_index": index,
                         "class_accuracy": record["class_accuracy"][index], "keep_ratio": record["keep_ratio"][index]})
    columns = CONFIG_COLUMNS + ["class", "class_index", "class_accuracy", "keep_ratio", "overall_accuracy",
                                "class_std", "key"]
    return pd.DataFrame(rows, columns=columns)


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Per (score, sparsity), averaged over seeds: overall accuracy, std of class accuracy, worst class."""
    runs = results.groupby("key").agg(score=("score", "first"), sparsity=("sparsity", "first"),
                                      seed=("seed", "first"), overall_accuracy=("overall_accuracy", "first"),
                                      class_std=("class_std", "first"), worst_class_accuracy=("class_accuracy", "min"))
    worst = results.loc[results.groupby("key")["class_accuracy"].idxmin(), ["key", "class"]].set_index("key")
    runs = runs.join(worst.rename(columns={"class": "worst_class"}))
    table = runs.groupby(["score", "sparsity"]).agg(
        seeds=("seed", "nunique"), accuracy=("overall_accuracy", "mean"), accuracy_sd=("overall_accuracy", "std"),
        class_std=("class_std", "mean"), worst_class_accuracy=("worst_class_accuracy", "mean"),
        worst_class=("worst_class", lambda s: s.mode().iloc[0]))
    return table.reset_index().sort_values(["sparsity", "score"], ignore_index=True)


def keep_ratio_table(results: pd.DataFrame) -> pd.DataFrame:
    """Class keep ratio (mean over seeds) with one row per (score, sparsity) and one column per class."""
    table = results.pivot_table(index=["score", "sparsity"], columns="class", values="keep_ratio", aggfunc="mean")
    order = results.drop_duplicates("class").sort_values("class_index")["class"]
    return table[list(order)].sort_index(level=["sparsity", "score"])


def format_table(table: pd.DataFrame) -> str:
    return table.to_string(float_format=lambda v: f"{v:.3f}" if np.isfinite(v) else "-")
