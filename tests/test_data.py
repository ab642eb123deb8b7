import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import CIFAR10, CIFAR100

from helpers import SHARED_CIFAR10_ZIP, write_fake_cifar, write_imagefolder
from datadiet_nb import data
from datadiet_nb.errors import UserError


def test_digits_split_is_deterministic_stratified_and_in_native_order():
    a, b = data.load("digits"), data.load("digits")
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    assert a.train_images.dtype == torch.uint8 and a.train_images.shape[1:] == (1, 8, 8)
    assert a.num_train + len(a.test_labels) == 1797 and a.num_classes == 10
    train_counts = np.bincount(a.train_labels.numpy())
    test_counts = np.bincount(a.test_labels.numpy())
    assert test_counts.tolist() == [90] * 10 and train_counts.min() == 84 and a.num_train == 897
    from sklearn.datasets import load_digits
    bunch = load_digits()  # native order: the train split is an increasing subsequence of the original
    first = np.rint(bunch.images[0] * 255 / 16).astype(np.uint8)
    assert np.array_equal(a.train_images[0, 0].numpy(), first) or np.array_equal(a.test_images[0, 0].numpy(), first)
    assert a.mean != (0.0,) and 0 < a.std[0] < 1


@pytest.mark.parametrize("name, cls, num_classes", [("cifar10", CIFAR10, 10), ("cifar100", CIFAR100, 100)])
def test_fake_cifar_loads_through_torchvision(name, cls, num_classes, data_root, monkeypatch):
    written = write_fake_cifar(data_root / name, cls, num_classes)
    for attr, value in written["checksums"].items():  # torchvision checks files against its md5 table
        monkeypatch.setattr(cls, attr, value)
    ds = data.load(name, download=False)
    assert ds.classes == tuple(written["classes"]) and ds.num_classes == num_classes
    expected = np.concatenate([b["data"] for b in written["train"]]).reshape(-1, 3, 32, 32)
    assert torch.equal(ds.train_images, torch.from_numpy(expected))  # native order, CHW, uint8
    labels = sum((b[written["label_key"]] for b in written["train"]), [])
    assert ds.train_labels.tolist() == labels
    assert ds.test_images.shape == (2 * num_classes, 3, 32, 32)
    assert ds.mean == data.CIFAR10_MEAN if name == "cifar10" else ds.mean == data.CIFAR100_MEAN


def test_missing_cifar_offline_gives_one_line_saying_where(data_root, monkeypatch):
    def no_network(self):
        raise OSError("network unreachable")
    monkeypatch.setattr(CIFAR10, "download", no_network)
    with pytest.raises(UserError) as error:
        data.load("cifar10")
    message = str(error.value)
    assert "\n" not in message and str(data_root / "cifar10") in message and "cifar-10-python.tar.gz" in message


def test_imagefolder_tree_and_zip_load_the_same_and_are_cached(tmp_path):
    tree = write_imagefolder(tmp_path / "tiny")
    from_tree = data.load(f"imagefolder:{tree}")
    assert from_tree.classes == ("cat", "dog", "frog") and from_tree.num_train == 12
    assert from_tree.train_labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    archive = tmp_path / "tiny.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(tree.rglob("*.png")):
            zf.write(path, path.relative_to(tree))
    from_zip = data.load(f"imagefolder:{archive}")
    assert torch.equal(from_zip.train_images, from_tree.train_images)
    assert torch.equal(from_zip.test_labels, from_tree.test_labels)
    # the second load reads the cached arrays: removing the extracted images does not matter
    cache = list((data.data_root() / "arrays").glob("tiny-*.npz"))
    assert len(cache) == 2
    # a cached zip is neither unpacked nor walked again
    shutil.rmtree(data.data_root() / "extracted")
    again = data.load(f"imagefolder:{archive}")
    assert torch.equal(again.train_images, from_tree.train_images) and again.mean == from_tree.mean
    assert not (data.data_root() / "extracted").exists()
    from PIL import Image
    first = sorted((tree / "train" / "cat").glob("*.png"))[0]
    assert np.array_equal(np.asarray(Image.open(first)), from_tree.train_images[0].permute(1, 2, 0).numpy())


@pytest.mark.parametrize("breakage, message", [
    ("no_test", "no test/ folder"), ("empty_class", "Found no valid file"),
    ("unreadable", "cannot read image"), ("class_mismatch", "differ from test classes"),
])
def test_bad_imagefolder_gives_one_line(tmp_path, breakage, message):
    tree = write_imagefolder(tmp_path / "bad")
    if breakage == "no_test":
        import shutil
        shutil.rmtree(tree / "test")
    elif breakage == "empty_class":
        for p in (tree / "train" / "dog").iterdir():
            p.unlink()
        for p in (tree / "train").rglob("*.png"):
            p.unlink()
    elif breakage == "unreadable":
        (tree / "train" / "dog" / "0001.png").write_bytes(b"not an image")
    elif breakage == "class_mismatch":
        (tree / "test" / "frog").rename(tree / "test" / "toad")
    with pytest.raises(UserError, match=message) as error:
        data.load(f"imagefolder:{tree}")
    assert "\n" not in str(error.value)
    if breakage == "unreadable":
        assert "0001.png" in str(error.value)


def test_unknown_dataset():
    with pytest.raises(UserError, match="unknown dataset"):
        data.load("mnist")


def test_class_balanced_subset_keeps_native_order():
    ds = data.load("digits").with_train_per_class(5)
    assert ds.num_train == 50 and np.all(np.bincount(ds.train_labels.numpy()) == 5)
    full = data.load("digits")
    first_zeros = np.flatnonzero(full.train_labels.numpy() == 0)[:5]
    assert torch.equal(ds.train_images[ds.train_labels == 0], full.train_images[first_zeros])


def test_random_crop_flip_is_a_shifted_window_of_the_reflect_padded_image():
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    out = data.random_crop_flip(images, g)
    assert out.shape == images.shape
    padded = torch.nn.functional.pad(images, (4,) * 4, mode="reflect")
    for i in range(2):
        windows = [padded[i, :, y:y + 32, x:x + 32] for y in range(9) for x in range(9)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)
    again = data.random_crop_flip(images, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_normalize_uses_channel_constants():
    images = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = data.normalize(images, torch.tensor(data.CIFAR10_MEAN), torch.tensor(data.CIFAR10_STD))
    torch.testing.assert_close(out[0, :, 0, 0], (1 - torch.tensor(data.CIFAR10_MEAN)) / torch.tensor(data.CIFAR10_STD))


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_CIFAR10_ZIP.is_file(), reason="../shared/data/cifar10.zip is absent")
def test_real_cifar10_zip_loads():
    ds = data.load(f"imagefolder:{SHARED_CIFAR10_ZIP}")
    assert ds.num_train == 50000 and len(ds.test_labels) == 10000
    assert ds.classes[3] == "cat" and ds.classes[5] == "dog"
    assert np.all(np.bincount(ds.train_labels.numpy()) == 5000)
    np.testing.assert_allclose(ds.mean, data.CIFAR10_MEAN, atol=2e-4)


def test_an_imagefolder_cache_is_refreshed_when_its_source_changes(tmp_path):
    tree = write_imagefolder(tmp_path / "tiny")
    archive = tmp_path / "tiny.zip"

    def zip_tree() -> None:
        with zipfile.ZipFile(archive, "w") as zf:
            for path in sorted(tree.rglob("*.png")):
                zf.write(path, path.relative_to(tree))

    zip_tree()
    before = {source: data.load(f"imagefolder:{source}") for source in (tree, archive)}
    from PIL import Image
    first = sorted((tree / "train" / "cat").glob("*.png"))[0]
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(first)  # one image edited
    zip_tree()
    for source, old in before.items():
        new = data.load(f"imagefolder:{source}")
        assert new.train_images[0].eq(0).all() and not old.train_images[0].eq(0).all(), source
        assert torch.equal(new.train_images[1:], old.train_images[1:])
    write_imagefolder(tmp_path / "tiny", classes=("cat",), train_per_class=5, seed=1)  # one image added
    assert data.load(f"imagefolder:{tree}").num_train == 13


def test_a_zip_with_its_folders_one_level_down_loads(tmp_path):
    tree = write_imagefolder(tmp_path / "tiny")
    archive = tmp_path / "nested.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(tree.rglob("*.png")):
            zf.write(path, Path("cifar-like") / path.relative_to(tree))
    nested, flat = data.load(f"imagefolder:{archive}"), data.load(f"imagefolder:{tree}")
    assert nested.classes == flat.classes and torch.equal(nested.train_images, flat.train_images)
    assert torch.equal(nested.test_labels, flat.test_labels)
