"""Datasets by name, held as uint8 tensors in native order, plus device-side batched augmentation.

Example ``i`` of a dataset is ``train_images[i]`` everywhere in the package: scores,
kept indices and results all refer to examples by that index.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError
from .store import write_arrays

DATA_ROOT_ENV = "DATADIET_DATA"
DEFAULT_DATA_ROOT = Path.home() / ".cache" / "datadiet_nb"
DOWNLOAD_TIMEOUT_S = 30

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)

DIGITS_TEST_PER_CLASS = 90  # test images of each class (one image moves a class's accuracy by 1.1 points)
DIGITS_SPLIT_SEED = 0
DIGITS_MAX_PIXEL = 16  # scikit-learn's digits are 4-bit intensities 0..16

CROP_PADDING = 4  # pixels of reflect padding before the random crop (32x32 sets)
IMAGEFOLDER_PREFIX = "imagefolder:"
DECODE_THREADS = 4


@dataclass(frozen=True)
class Dataset:
    """A classification dataset: uint8 images [N, C, H, W] and int64 labels, in native order."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    full: "Dataset | None" = None  # the dataset this one's training set was cut from (None: not a subset)
    source_indices: torch.Tensor | None = None  # position of each training example in ``full``

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_train(self) -> int:
        return len(self.train_labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])

    def with_train_per_class(self, per_class: int | None) -> "Dataset":
        """The first ``per_class`` training examples of each class, native order kept; test set unchanged. A size
        larger than the smallest class is refused (the subset would no longer be class-balanced)."""
        if per_class is None:
            return self
        labels = self.train_labels.numpy()
        class_sizes = np.bincount(labels, minlength=self.num_classes)
        smallest = int(class_sizes.argmin())
        if per_class > class_sizes[smallest]:
            raise UserError(f"{per_class} training images per class is more than {self.name} has of class "
                            f"{self.classes[smallest]!r} ({class_sizes[smallest]}): choose at most "
                            f"{class_sizes[smallest]}")
        keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(self.num_classes)]))
        index = torch.from_numpy(keep)
        return replace(self, name=f"{self.name}[{per_class}/class]",
                       train_images=self.train_images[index], train_labels=self.train_labels[index],
                       full=self, source_indices=index)

    def describe(self) -> dict:
        """What identifies this dataset in a config or a record."""
        return {"name": self.name, "num_train": self.num_train, "num_test": len(self.test_labels),
                "image_shape": list(self.image_shape), "classes": list(self.classes),
                "mean": list(self.mean), "std": list(self.std)}


def data_root() -> Path:
    """Where datasets are downloaded, extracted and cached: ``$DATADIET_DATA`` or ``~/.cache/datadiet_nb``."""
    return Path(os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT).expanduser()


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1] (population std)."""
    x = images.to(torch.float64).div_(255).transpose(0, 1).reshape(images.shape[1], -1)
    return tuple(round(v, 4) for v in x.mean(1).tolist()), tuple(round(v, 4) for v in x.std(1, correction=0).tolist())


def _as_nchw_uint8(array: np.ndarray) -> torch.Tensor:
    """NHWC (or NHW) uint8 numpy array to a contiguous NCHW uint8 tensor."""
    if array.ndim == 3:
        array = array[..., None]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))


# --- digits: scikit-learn's bundled 8x8 handwritten digits ------------------------------------

def load_digits_dataset() -> Dataset:
    """scikit-learn's 1,797 digits: :data:`DIGITS_TEST_PER_CLASS` test images of each class drawn with a fixed
    seed, the other 897 (84 to 93 of each class) for training; native order kept in both."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255 / DIGITS_MAX_PIXEL)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    test_parts = []
    for c in range(len(bunch.target_names)):
        test_parts.append(rng.choice(np.flatnonzero(labels == c), DIGITS_TEST_PER_CLASS, replace=False))
    test = np.sort(np.concatenate(test_parts))
    train = np.setdiff1d(np.arange(len(labels)), test)
    train_images = _as_nchw_uint8(images[train])
    mean, std = channel_stats(train_images)
    return Dataset("digits", train_images, torch.from_numpy(labels[train]), _as_nchw_uint8(images[test]),
                   torch.from_numpy(labels[test]), tuple(str(c) for c in bunch.target_names), mean, std)


# --- CIFAR through torchvision ---------------------------------------------------------------

def _torchvision_cifar(cls, folder: Path, train: bool, download: bool):
    try:
        return cls(str(folder), train=train, download=False)
    except RuntimeError:
        if not download:
            raise
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return cls(str(folder), train=train, download=True)
    finally:
        socket.setdefaulttimeout(previous)


def _load_cifar(name: str, download: bool) -> Dataset:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls, archive, mean, std = {
        "cifar10": (CIFAR10, "cifar-10-python.tar.gz", CIFAR10_MEAN, CIFAR10_STD),
        "cifar100": (CIFAR100, "cifar-100-python.tar.gz", CIFAR100_MEAN, CIFAR100_STD),
    }[name]
    folder = data_root() / name
    try:
        train = _torchvision_cifar(cls, folder, True, download)
        test = _torchvision_cifar(cls, folder, False, download)
    except Exception as error:  # offline, checksum mismatch, partial download
        raise UserError(
            f"{name} not found in {folder} and could not be downloaded ({type(error).__name__}); "
            f"put {archive} or its extracted {cls.base_folder}/ folder there (or set ${DATA_ROOT_ENV})") from None
    return Dataset(name, _as_nchw_uint8(train.data), torch.tensor(train.targets, dtype=torch.int64),
                   _as_nchw_uint8(test.data), torch.tensor(test.targets, dtype=torch.int64),
                   tuple(train.classes), mean, std)


# --- imagefolder:<path>: any ImageFolder tree with train/ and test/, or a .zip of one -----------

def _fingerprint(path: Path) -> str:
    """A short hash of a file or tree's path, sizes and modification times (cheap change detection)."""
    digest = hashlib.sha256(str(path.resolve()).encode())
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        stat = p.stat()
        digest.update(f"{p.relative_to(path) if p != path else p.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _extract_once(archive: Path) -> Path:
    """Extract a zip into the data root the first time it is seen; atomic, so a crash leaves no half tree."""
    target = data_root() / "extracted" / f"{archive.stem}-{_fingerprint(archive)}"
    if target.is_dir():
        return target
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(staging)
    except zipfile.BadZipFile:
        raise UserError(f"{archive} is not a readable zip file") from None
    # Accept a zip whose train/ and test/ sit one folder down.
    inner = [p for p in staging.iterdir() if p.is_dir()]
    root = staging if (staging / "train").is_dir() or len(inner) != 1 else inner[0]
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(root, target)
    shutil.rmtree(staging, ignore_errors=True)
    return target


def _decode(path: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as error:
        raise UserError(f"cannot read image {path} ({type(error).__name__})") from None


def _decode_split(folder: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from torchvision.datasets import ImageFolder

    try:
        tree = ImageFolder(str(folder))
    except (FileNotFoundError, OSError) as error:
        raise UserError(f"{folder}: {error}") from None
    paths = [p for p, _ in tree.samples]
    with ThreadPoolExecutor(DECODE_THREADS) as pool:
        images = list(pool.map(_decode, paths, chunksize=256))
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise UserError(f"{folder}: images differ in size ({sorted(shapes)[:3]}...); resize them to one size first")
    return np.stack(images), np.array(tree.targets, dtype=np.int64), list(tree.classes)


def _load_imagefolder(spec: str) -> Dataset:
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"imagefolder path {path} does not exist")
    # Keyed by the source as given: a zip's own size and mtime, so a cached load never unpacks or walks the tree.
    cache = data_root() / "arrays" / f"{path.stem}-{_fingerprint(path)}.npz"
    if cache.is_file():
        with np.load(cache) as arrays:
            train_x, train_y, test_x, test_y = (arrays[k] for k in ("train_x", "train_y", "test_x", "test_y"))
            classes = [str(c) for c in arrays["classes"]]
            stats = (arrays["mean"], arrays["std"]) if "mean" in arrays.files else None
    else:
        train_x, train_y, test_x, test_y, classes = _decode_tree(path, _extract_once(path) if path.is_file() else path)
        stats = channel_stats(_as_nchw_uint8(train_x))
        write_arrays(cache, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, classes=np.array(classes),
                     mean=np.array(stats[0]), std=np.array(stats[1]))
    train_images = _as_nchw_uint8(train_x)
    mean, std = (tuple(float(v) for v in s) for s in stats) if stats is not None else channel_stats(train_images)
    return Dataset(f"{IMAGEFOLDER_PREFIX}{path.name}", train_images, torch.from_numpy(train_y),
                   _as_nchw_uint8(test_x), torch.from_numpy(test_y), tuple(classes), mean, std)


def _decode_tree(path: Path, tree: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Decode ``tree``'s train/ and test/ splits (``path`` is what the user named, for messages)."""
    for split in ("train", "test"):
        if not (tree / split).is_dir():
            raise UserError(f"{path} has no {split}/ folder; an imagefolder dataset needs train/<class>/ and test/<class>/")
    train_x, train_y, classes = _decode_split(tree / "train")
    test_x, test_y, test_classes = _decode_split(tree / "test")
    if classes != test_classes:
        raise UserError(f"{path}: train classes {classes} differ from test classes {test_classes}")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise UserError(f"{path}: train images are {train_x.shape[1:]}, test images {test_x.shape[1:]}")
    return train_x, train_y, test_x, test_y, classes


DATASETS: dict[str, Callable[[bool], Dataset]] = {
    "digits": lambda download: load_digits_dataset(),
    "cifar10": lambda download: _load_cifar("cifar10", download),
    "cifar100": lambda download: _load_cifar("cifar100", download),
}


def check_name(name: str) -> None:
    """Raise a one-line UserError for a dataset name that :func:`load` would not know."""
    if name not in DATASETS and not name.startswith(IMAGEFOLDER_PREFIX):
        raise UserError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)} or imagefolder:<path>")


def load(name: str, *, download: bool = True) -> Dataset:
    """Load a dataset by name: ``digits``, ``cifar10``, ``cifar100`` or ``imagefolder:<dir or .zip>``."""
    check_name(name)
    if name.startswith(IMAGEFOLDER_PREFIX):
        return _load_imagefolder(name[len(IMAGEFOLDER_PREFIX):])
    return DATASETS[name](download)


# --- on-device batches -----------------------------------------------------------------------

def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] to float, scaled to [0, 1] and standardised per channel."""
    return (images.float().div_(255) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def crop_flip_draws(n: int, generator: torch.Generator, padding: int = CROP_PADDING) -> torch.Tensor:
    """Row offset, column offset and flip (0/1) of :func:`crop_flip` for ``n`` images, as int64 [3, n] on the CPU.

    Drawn from a CPU ``generator``, so a seed gives the same augmentation on any device; a training run draws a
    whole pass at once and copies it to the device once.
    """
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = (torch.rand(n, generator=generator) < 0.5).long()
    return torch.stack([dy, dx, flip])


def crop_flip(images: torch.Tensor, draws: torch.Tensor, padding: int = CROP_PADDING) -> torch.Tensor:
    """Reflect-pad, crop back to size at the drawn offsets and flip where drawn, for a whole batch at once.

    ``draws``: :func:`crop_flip_draws` of this batch, on the images' device (no host copy here).
    """
    n, c, h, w = images.shape
    device = images.device
    dy, dx, flip = draws[0], draws[1], draws[2].bool()
    padded = F.pad(images, (padding,) * 4, mode="reflect")
    rows = (dy[:, None] + torch.arange(h, device=device))[:, None, :, None]
    cols = dx[:, None] + torch.arange(w, device=device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    batch = torch.arange(n, device=device)[:, None, None, None]
    channel = torch.arange(c, device=device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = CROP_PADDING) -> torch.Tensor:
    """:func:`crop_flip` with offsets drawn here from a CPU ``generator`` (for one batch)."""
    return crop_flip(images, crop_flip_draws(len(images), generator, padding).to(images.device), padding)


def batch_indices(n: int, batch_size: int, *, generator: torch.Generator | None = None,
                  drop_last: bool = False) -> Iterator[torch.Tensor]:
    """Index batches over ``range(n)``: shuffled when a generator is given, in native order otherwise."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]
