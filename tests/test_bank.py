"""The score bank: an export holds exactly the store's scores and kept indices, with the data's identity, and bad
requests get one line and exit 2 with nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest

from datadiet_nb import bank, presets
from datadiet_nb.cli import main
from datadiet_nb.errors import UserError
from datadiet_nb.experiment import compute_scores, load_dataset, scored_dataset, scores_config
from datadiet_nb.store import Store, config_key, npz_bytes
from datadiet_nb.sweep import run_sweep

TINY = ["recipe.epochs=2", "scoring.num_runs=2", "scoring.epoch=1", "sparsities=0,0.5", "seeds=0,1"]


def sets(assignments):
    return [arg for assignment in assignments for arg in ("--set", assignment)]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A tiny digits study on a class-balanced subset (20 per class) pruned by full-set scores, swept."""
    overrides = [*TINY, "train_per_class=20", "scoring.full_train=true"]
    preset = presets.with_overrides(presets.get("digits"), overrides)
    store = Store(tmp_path_factory.mktemp("bank") / "runs")
    run_sweep(preset, store, progress=False)
    return preset, overrides, store


def test_an_export_holds_the_stores_scores_and_kept_indices_in_the_scored_sets_positions(study, tmp_path, capsys):
    preset, overrides, store = study
    out = tmp_path / "digits.npz"
    assert main(["export", "--preset", "digits", "--store", str(store.root), "--out", str(out), *sets(overrides)]) == 0
    assert f"{out}: digits's scores" in capsys.readouterr().out
    header, arrays = bank.read(out)
    dataset = load_dataset(preset)
    full = scored_dataset(preset, dataset)
    scores = compute_scores(preset, dataset, store)
    assert header["format_version"] == bank.FORMAT_VERSION and header["num_runs"] == 2
    assert header["dataset"] == bank.dataset_identity(full) and header["dataset"]["num_train"] == full.num_train
    assert header["config"] == json.loads(json.dumps(scores_config(preset, dataset)))
    assert header["scores_key"] == config_key(scores_config(preset, dataset))
    assert set(header["scores"]) == set(scores) and header["scores"]["el2n_at0_runs"]["epoch"] == 0
    for name, array in scores.items():
        assert np.array_equal(arrays[f"scores/{name}"], array)
    assert np.array_equal(arrays["labels"], full.train_labels.numpy())
    pruned = [r for r in store.records() if r["sparsity"] > 0]
    assert len(header["kept"]) == len(pruned) == 6  # el2n, grand, random x 2 seeds
    for label, entry in header["kept"].items():
        kept_in_subset = store.load_kept(entry["run_key"])
        positions = arrays[f"kept/{label}"]
        assert np.array_equal(positions, dataset.source_indices.numpy()[kept_in_subset])  # mapped to the full set
        assert np.array_equal(full.train_labels.numpy()[positions], dataset.train_labels.numpy()[kept_in_subset])
        assert entry["num_kept"] == len(positions) == 100 and entry["train_per_class"] == 20


def test_the_bank_reads_with_numpy_alone(study, tmp_path):
    preset, _, store = study
    bank.export(preset, store, tmp_path / "plain.npz")
    with np.load(tmp_path / "plain.npz", allow_pickle=False) as archive:
        assert json.loads(str(archive["header"]))["format"] == bank.FORMAT
        assert archive["scores/el2n"].shape == (load_dataset(preset).full.num_train,)


def test_an_export_never_replaces_a_file_or_computes_scores(study, tmp_path, capsys):
    preset, overrides, store = study
    out = tmp_path / "taken.npz"
    out.write_bytes(b"mine")
    assert main(["export", "--store", str(store.root), "--out", str(out), *sets(overrides)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"datadiet-nb: error: {out} exists; choose another --out or pass --force to replace it"]
    assert out.read_bytes() == b"mine"
    empty = tmp_path / "empty"
    assert main(["export", "--store", str(empty), "--out", str(tmp_path / "new.npz"), *sets(overrides)]) == 2
    assert "no scores of digits in" in capsys.readouterr().err and not (tmp_path / "new.npz").exists()
    assert not empty.exists()  # nothing trained, nothing written
    assert main(["export", "--store", str(store.root), "--out", str(out), "--force", *sets(overrides)]) == 0
    assert bank.read(out)[0]["preset"] == "digits"


@pytest.mark.parametrize("content, message", [
    (b"not a zip", "is not a score bank (.npz)"),
    (npz_bytes(scores=np.zeros(3)), "an .npz without a header"),
    (npz_bytes(header=np.array(json.dumps({"format": "other"}))), "not a datadiet-nb score bank (format 'other')"),
    (npz_bytes(header=np.array(json.dumps({"format": bank.FORMAT, "format_version": bank.FORMAT_VERSION + 1}))),
     "this datadiet-nb reads format 1 and older"),
])
def test_reading_what_is_not_a_bank_says_why(tmp_path, content, message):
    path = tmp_path / "file.npz"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        bank.read(path)


def test_a_regime_studys_bank_names_each_size(tmp_path):
    overrides = ["recipe.epochs=2", "scoring.num_runs=1", "scoring.epoch=1", "scoring.trajectory=", "seeds=0",
                 "train_sizes=8,24", "scores=el2n,el2n-easy"]
    preset = presets.with_overrides(presets.get("digits-regime"), overrides)
    store = Store(tmp_path / "runs")
    run_sweep(preset, store, progress=False)
    header, arrays = bank.export(preset, store, tmp_path / "regime.npz"), bank.read(tmp_path / "regime.npz")[1]
    assert set(header["kept"]) == {f"n{n}-{rule}-s0.5-seed0" for n in (8, 24) for rule in ("el2n", "el2n-easy")}
    labels = arrays["labels"]
    for label, entry in header["kept"].items():
        counts = np.bincount(labels[arrays[f"kept/{label}"]], minlength=10)
        assert counts.sum() == entry["num_kept"] == entry["train_per_class"] * 5 and counts.max() <= entry["train_per_class"]
