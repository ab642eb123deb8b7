"""Shared fixtures: an isolated data root, fake CIFAR files in torchvision's format, tiny presets."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datadiet_nb import presets

SHARED_CIFAR10_ZIP = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10.zip"


@pytest.fixture(autouse=True)
def data_root(tmp_path, monkeypatch) -> Path:
    """Every test gets its own empty data root: nothing is read from or written to ~/.cache."""
    root = tmp_path / "data_root"
    monkeypatch.setenv("DATADIET_DATA", str(root))
    return root


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


@pytest.fixture
def tiny_digits() -> presets.Preset:
    """The digits preset cut down to seconds: 2 epochs, one scoring run at epoch 1, two sparsities."""
    return presets.with_overrides(presets.get("digits"), [
        "recipe.epochs=2", "scoring.num_runs=1", "scoring.epoch=1", "sparsities=0,0.5", "seeds=0"])

