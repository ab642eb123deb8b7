"""The numbers and tables the book quotes, computed from run records (never typed by hand)."""

from __future__ import annotations

import pandas as pd

from .presets import DENSE, PRUNING_SCORES, Preset
from .results import summarize
from .store import Store

HEADLINE_SPARSITY = 0.5


class GlueText(str):
    """A string that myst-nb's ``{glue:text}`` shows without quotes."""

    def __repr__(self) -> str:
        return str(self)


def pruning_scores(results: pd.DataFrame) -> list[str]:
    return [s for s in PRUNING_SCORES if s in set(results["score"])]


def _nearest(results: pd.DataFrame, score: str, target: float) -> float | None:
    sparsities = results.loc[results["score"] == score, "sparsity"].unique()
    return None if len(sparsities) == 0 else float(min(sparsities, key=lambda s: abs(s - target)))


def _percent(value: float) -> GlueText:
    return GlueText(f"{100 * value:.1f} %")


def headline_numbers(results: pd.DataFrame) -> dict[str, GlueText]:
    """Dense accuracy and spread, worst dense class, and per score the accuracy, spread and most-kept classes
    at 50 % sparsity (or the nearest sparsity run, which the text then names)."""
    runs = results.drop_duplicates("key")
    dense = runs[runs["score"] == DENSE]
    dense_classes = results[results["score"] == DENSE].groupby("class")["class_accuracy"].mean()
    numbers = {
        "dense_accuracy": _percent(dense["overall_accuracy"].mean()) if len(dense) else GlueText("n/a"),
        "dense_class_std": _percent(dense["class_std"].mean()) if len(dense) else GlueText("n/a"),
        "dense_worst_class": GlueText(f"{dense_classes.idxmin()} ({_percent(dense_classes.min())})")
        if len(dense_classes) else GlueText("n/a"),
        "num_runs": GlueText(str(len(runs))),
    }
    for score in PRUNING_SCORES:
        sparsity = _nearest(results, score, HEADLINE_SPARSITY)
        where = "" if sparsity in (None, HEADLINE_SPARSITY) else f" (at sparsity {sparsity:g})"
        at = runs[(runs["score"] == score) & (runs["sparsity"] == sparsity)]
        keep = results[(results["score"] == score) & (results["sparsity"] == sparsity)]
        top = keep.groupby("class")["keep_ratio"].mean().sort_values(ascending=False).head(2)
        numbers[f"{score}_accuracy_50"] = (GlueText(_percent(at["overall_accuracy"].mean()) + where)
                                           if len(at) else GlueText("n/a"))
        numbers[f"{score}_class_std_50"] = (GlueText(_percent(at["class_std"].mean()) + where)
                                            if len(at) else GlueText("n/a"))
        numbers[f"{score}_top_keep_classes"] = (GlueText(" and ".join(f"{c} ({r:.2f})" for c, r in top.items()) + where)
                                                if len(top) else GlueText("n/a"))
    return numbers


def summary_table(results: pd.DataFrame) -> pd.DataFrame:
    """Sparsity x score: overall accuracy, std of class accuracy, worst class (mean over seeds)."""
    table = summarize(results)
    return table.set_index(["sparsity", "score"]).round(4)


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


def failures_note(failures: dict[str, str]):
    """A visible note naming the jobs that failed (and so are missing from every figure and table); None if none."""
    if not failures:
        return None
    from IPython.display import Markdown
    lines = [f"- `{label}`: {message.splitlines()[0] if message else 'failed'}" for label, message in failures.items()]
    return Markdown("**Failed jobs, left out of every figure and table on this page** "
                    "(`datadiet-nb sweep --retry-failed` runs them again):\n\n" + "\n".join(lines))
