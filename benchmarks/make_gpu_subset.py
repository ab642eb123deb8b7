"""Write the CIFAR-10 subset that ``benchmarks/gpu_check.py`` carries to a lent GPU (the whole zip does not fit).

    python benchmarks/make_gpu_subset.py [--zip ../shared/data/cifar10.zip] [--train-per-class 500]
                                         [--test-per-class 100] [--out data/cifar10-subset.npz]

The first images of each class in native order (uint8 NCHW), their labels and the class names, in one
compressed npz under the git-ignored ``data/``; the defaults make 5,000 train and 1,000 test images.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from datadiet_nb import data  # noqa: E402  (the repo root must be on sys.path first)
from datadiet_nb.store import atomic_write_bytes  # noqa: E402

SHARED_ZIP = REPO.parent / "shared" / "data" / "cifar10.zip"
DEFAULT_SUBSET = REPO / "data" / "cifar10-subset.npz"
SUBSET_NAME = "cifar10-subset"
TRAIN_PER_CLASS = 500
TEST_PER_CLASS = 100


def first_per_class(labels: torch.Tensor, per_class: int, num_classes: int) -> torch.Tensor:
    """Indices of the first ``per_class`` examples of each class, in native order."""
    labels = labels.numpy()
    keep = [np.flatnonzero(labels == c)[:per_class] for c in range(num_classes)]
    return torch.from_numpy(np.sort(np.concatenate(keep)))


def cut(dataset: data.Dataset, train_per_class: int, test_per_class: int) -> data.Dataset:
    """The first ``train_per_class`` training and ``test_per_class`` test images of each class."""
    train = first_per_class(dataset.train_labels, train_per_class, dataset.num_classes)
    test = first_per_class(dataset.test_labels, test_per_class, dataset.num_classes)
    return data.Dataset(SUBSET_NAME, dataset.train_images[train], dataset.train_labels[train],
                        dataset.test_images[test], dataset.test_labels[test], dataset.classes,
                        data.CIFAR10_MEAN, data.CIFAR10_STD)


def save_subset(path: Path, dataset: data.Dataset) -> None:
    """Write ``dataset``'s images, labels and class names to ``path`` (compressed npz, atomically)."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, train_images=dataset.train_images.numpy(), train_labels=dataset.train_labels.numpy(),
                        test_images=dataset.test_images.numpy(), test_labels=dataset.test_labels.numpy(),
                        classes=np.array(dataset.classes))
    atomic_write_bytes(path, buffer.getvalue())


def load_subset(path: Path) -> data.Dataset:
    """The subset written by :func:`save_subset`, normalised with the CIFAR-10 constants."""
    with np.load(path) as arrays:
        tensors = [torch.from_numpy(arrays[k]) for k in ("train_images", "train_labels", "test_images", "test_labels")]
        classes = tuple(str(c) for c in arrays["classes"])
    return data.Dataset(SUBSET_NAME, *tensors, classes, data.CIFAR10_MEAN, data.CIFAR10_STD)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zip", type=Path, default=SHARED_ZIP, help="the JPEG CIFAR-10 ImageFolder zip")
    parser.add_argument("--train-per-class", type=int, default=TRAIN_PER_CLASS)
    parser.add_argument("--test-per-class", type=int, default=TEST_PER_CLASS)
    parser.add_argument("--out", type=Path, default=DEFAULT_SUBSET)
    args = parser.parse_args()
    subset = cut(data.load(f"{data.IMAGEFOLDER_PREFIX}{args.zip}"), args.train_per_class, args.test_per_class)
    save_subset(args.out, subset)
    print(f"wrote {args.out}: {subset.num_train} train and {len(subset.test_labels)} test images, "
          f"{subset.num_classes} classes, {args.out.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
