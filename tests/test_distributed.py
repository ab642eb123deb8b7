"""One run over several processes (torchrun, gloo on this CPU): counts, gathering and scores against one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from datadiet_nb import presets
from datadiet_nb.cli import main
from datadiet_nb.data import normalize
from datadiet_nb.experiment import load_dataset, seeded_model
from datadiet_nb.metrics import class_accuracy
from datadiet_nb.scores import SCORE_FUNCTIONS
from datadiet_nb.train import predict

SCRIPT = Path(__file__).parent / "scripts" / "distributed_parts.py"
TINY = ["--set", "recipe.epochs=4", "--set", "scoring.num_runs=2", "--set", "scoring.epoch=1", "--set", "seeds=0"]


def torchrun(nproc: int, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           *arguments], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("nproc", [2, 3])
def test_ranks_count_every_test_image_once_and_gather_scores_in_native_order(nproc, tmp_path):
    result = torchrun(nproc, str(SCRIPT), str(tmp_path / "parts.npz"))
    assert result.returncode == 0, result.stderr[-3000:]
    got = np.load(tmp_path / "parts.npz")
    assert int(got["world_size"]) == nproc
    num_test, num_scored = 101, 97  # as in the script: neither is a multiple of the world size
    assert np.array_equal(got["indices"], np.arange(num_test))  # each index once, in order
    preset = presets.get("digits")
    dataset = load_dataset(preset)
    model = seeded_model(preset, dataset, seed=3)
    predictions = predict(model, dataset.test_images[:num_test], dataset, batch_size=16).numpy()
    labels = dataset.test_labels[:num_test].numpy()
    assert np.array_equal(got["predictions"], predictions)
    # per-class accuracy from counts summed over ranks: each test image counted exactly once
    assert np.array_equal(got["class_accuracy"], class_accuracy(predictions, labels, dataset.num_classes))
    inputs = normalize(dataset.train_images[:num_scored], torch.tensor(dataset.mean), torch.tensor(dataset.std))
    for name, score in SCORE_FUNCTIONS.items():
        expected = score(model, inputs, dataset.train_labels[:num_scored], batch_size=8).double().numpy()
        np.testing.assert_allclose(got[name], expected, rtol=0, atol=1e-5, err_msg=name)


def test_train_nproc_2_matches_one_process_within_tolerance_and_records_one_run(tmp_path, capsys):
    """DDP cannot be bit-identical to one process: each rank draws its own batches (half the global batch) and
    augmentation, and gradients are summed in another order. On digits the two agree to within 2 points of
    overall accuracy and 4 test images (about 0.11) in any class."""
    store = tmp_path / "runs"
    assert main(["train", "--nproc", "2", "--store", str(store), "--quiet", *TINY, "--sparsity", "0.5"]) == 0
    assert main(["train", "--store", str(tmp_path / "one"), "--quiet", *TINY, "--sparsity", "0.5"]) == 0
    [ddp] = [json.loads(p.read_text()) for p in (store / "runs").glob("*.json")]
    [one] = [json.loads(p.read_text()) for p in (tmp_path / "one" / "runs").glob("*.json")]
    assert ddp["key"] == one["key"] and ddp["score"] == "el2n"  # the same run, computed another way
    assert ddp["distributed"]["world_size"] == 2 and ddp["distributed"]["backend"] == "gloo"
    assert ddp["distributed"]["class_accuracy_from_counts"] == pytest.approx(ddp["class_accuracy"], abs=0)
    assert len(ddp["predictions"]) == len(one["predictions"])
    assert abs(ddp["overall_accuracy"] - one["overall_accuracy"]) <= 0.02
    assert np.max(np.abs(np.subtract(ddp["class_accuracy"], one["class_accuracy"]))) <= 0.11
    scores = list((store / "scores").glob("*.npz"))
    assert len(scores) == 1 and not list((store / "checkpoints").glob("*")) and not list((store / "claims").glob("*"))
    events = [line.split()[3:5] for line in (store / "events.log").read_text().splitlines()]
    # the 2 scoring runs, their average and the run, each started once
    assert [e for e, _ in events].count("start") == 4 and ["start", ddp["key"]] in events
    # run again: the record is found, nothing is trained
    before = (store / "events.log").read_text()
    assert main(["train", "--nproc", "2", "--store", str(store), "--quiet", *TINY, "--sparsity", "0.5"]) == 0
    assert (store / "events.log").read_text() == before


def test_sync_batchnorm_on_cpus_is_refused_in_one_line(tmp_path, capsys):
    assert main(["train", "--nproc", "2", "--sync-batchnorm", "--store", str(tmp_path / "runs"), "--quiet", *TINY,
                 "--sparsity", "0"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line == ("datadiet-nb: error: --sync-batchnorm needs GPUs; on CPUs each rank normalises with its own "
                    "batch's statistics")
    assert not (tmp_path / "runs").exists()


def test_train_nproc_2_on_the_gpu_path_compiles_the_ddp_model(tmp_path, monkeypatch):
    """DDP on the path a GPU takes (bf16 autocast, channels_last, torch.compile of the DDP-wrapped model, so its
    all-reduce can overlap the compiled backward), on gloo ranks."""
    monkeypatch.setenv("DATADIET_GPU_PATH_ON_CPU", "1")
    store = tmp_path / "runs"
    assert main(["train", "--nproc", "2", "--store", str(store), "--quiet", *TINY, "--set", "recipe.compile=true",
                 "--sparsity", "0"]) == 0
    [ddp] = [json.loads(p.read_text()) for p in (store / "runs").glob("*.json")]
    assert ddp["train"]["path"] == {"compile": True, "autocast": True, "channels_last": True}
    assert ddp["distributed"]["world_size"] == 2 and ddp["overall_accuracy"] > 0.5  # it learned, 10 classes
