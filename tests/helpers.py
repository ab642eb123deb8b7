"""What several test modules share: fake datasets on disk (CIFAR in torchvision's format, ImageFolder trees),
and hand computations the tests compare the package's numbers with."""

from __future__ import annotations

import hashlib
import pickle
import signal
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

SHARED_CIFAR10_ZIP = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10.zip"


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_fake_cifar(root: Path, cls, num_classes: int, per_class_train: int = 3, per_class_test: int = 2,
                     seed: int = 0) -> dict:
    """Write a tiny CIFAR-10/100 in torchvision's pickled on-disk layout under ``root``.

    Returns the arrays written. torchvision verifies files by md5 against a built-in table;
    the caller patches that table with the md5s returned in ``"checksums"``.
    """
    rng = np.random.default_rng(seed)
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    label_key = "labels" if num_classes == 10 else "fine_labels"
    names = [f"class{i:02d}" for i in range(num_classes)]

    def batch(per_class: int):
        labels = np.repeat(np.arange(num_classes), per_class)
        rng.shuffle(labels)
        pixels = rng.integers(0, 256, size=(len(labels), 3 * 32 * 32), dtype=np.uint8)
        return {"data": pixels, label_key: labels.tolist()}

    train_files = [name for name, _ in cls.train_list]
    written = {"train": [batch(per_class_train) for _ in train_files], "test": batch(per_class_test)}
    for name, content in zip(train_files, written["train"]):
        (folder / name).write_bytes(pickle.dumps(content))
    (folder / cls.test_list[0][0]).write_bytes(pickle.dumps(written["test"]))
    (folder / cls.meta["filename"]).write_bytes(pickle.dumps({cls.meta["key"]: names}))
    written["checksums"] = {
        "train_list": [[name, _md5(folder / name)] for name in train_files],
        "test_list": [[cls.test_list[0][0], _md5(folder / cls.test_list[0][0])]],
        "meta": {**cls.meta, "md5": _md5(folder / cls.meta["filename"])},
    }
    written["classes"], written["label_key"] = names, label_key
    return written


def write_imagefolder(root: Path, classes=("cat", "dog", "frog"), train_per_class=4, test_per_class=2,
                      size=(32, 32), seed=0) -> Path:
    """A small ImageFolder tree with train/ and test/ of random PNG images."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i:04d}.png")
    return root


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
        p = float("nan")  # a lower bound of the test's p: the seeds alone (the test adds the test set's error)
        if score != "dense" and len(seeds) >= 2:
            pruned = [run["std"] for run in runs]
            dense = [per_run[("dense", 0.0, seed)]["std"] for seed in seeds]
            p = ttest_rel(pruned, dense, alternative="less").pvalue
        table[(score, sparsity)] = {
            "overall_accuracy": np.mean([run["overall"] for run in runs]),
            "class_std": np.mean([run["std"] for run in runs]),
            "worst_class_accuracy": np.mean([run["worst"] for run in runs]),
            "worst_class": min(worst, key=lambda name: (-worst[name], name)), "num_seeds": len(seeds),
            "std_below_dense_p_seeds_alone": p, "keep_ratio": np.mean([run["keep_ratio"] for run in runs], axis=0)}
    return table


def diverge_runs_of(score: str, setattr=setattr) -> None:
    """Make the training runs pruned by ``score`` diverge for real: they train with a learning rate of 1e12.

    ``setattr`` is pytest's ``monkeypatch.setattr`` in a test (undone after it); a subprocess that must fail the
    same way calls this from a ``sitecustomize.py`` (see ``DIVERGE_IN_EVERY_PROCESS``).
    """
    import dataclasses

    from datadiet_nb import experiment

    real_train, real_kept, current = experiment.train, experiment.kept_indices, {}

    def kept_indices(preset, dataset, s, *args, **kwargs):
        current["score"] = s
        return real_kept(preset, dataset, s, *args, **kwargs)

    def train(model, dataset, recipe, **kwargs):
        if current.pop("score", None) == score:
            recipe = dataclasses.replace(recipe, lr=1e12)
        return real_train(model, dataset, recipe, **kwargs)

    setattr(experiment, "kept_indices", kept_indices)
    setattr(experiment, "train", train)


# A sitecustomize.py (put its folder on PYTHONPATH) that makes every Python process of a test, notebook kernels
# included, diverge the runs of one score.
DIVERGE_IN_EVERY_PROCESS = f"""\
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from helpers import diverge_runs_of
diverge_runs_of({{score!r}})
"""


def interruptible() -> None:
    """Popen's ``preexec_fn`` for a child the test will SIGINT: the signal back to its default action, since a
    shell's background job (``cmd &``) ignores SIGINT and its children inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# --- comparing a study with an uninterrupted reference ----------------------------------------

def table(store: Path) -> pd.DataFrame:
    from datadiet_nb.results import load_results, summarize
    return summarize(load_results(store))


def predictions_by_key(store: Path) -> dict:
    from datadiet_nb.store import Store
    return {r["key"]: r["predictions"] for r in Store(store).records()}


def assert_same_study(store: Path, reference: Path) -> None:
    """Same runs, each recorded once, with predictions equal to the uninterrupted sweep's, bit for bit."""
    assert predictions_by_key(store) == predictions_by_key(reference)
    pd.testing.assert_frame_equal(table(store), table(reference))
    assert not list((store / "claims").glob("*.claim")), "a finished sweep leaves no claim behind"
    assert not list((store / "checkpoints").glob("*")), "a finished sweep leaves no checkpoint behind"
    assert not list(store.rglob("*.tmp")), "no half-written file is left"


def study_toml(epochs: int) -> str:
    """A small digits study as a preset file: sparsities 0 and 0.5, one seed, a checkpoint after every pass of
    ``epochs``, two scoring runs scored at epoch 1."""
    return (f'base = "digits"\nsparsities = [0.0, 0.5]\nseeds = [0]\ncheckpoint_epochs = 1\n[recipe]\n'
            f'epochs = {epochs}\n[scoring]\nnum_runs = 2\nepoch = 1\n')
