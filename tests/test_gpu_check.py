"""benchmarks/gpu_check.py at tiny sizes on the CPU (``--smoke``), so that the GPU check cannot rot between GPU loans:
every stage runs and measures, a stage that crashes, raises or hangs is named while the others run, no CUDA is an
error outside the smoke run; the smoke run reads a subset file made here as make_gpu_subset.py makes one."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from helpers import write_imagefolder

from datadiet_nb.data import CIFAR10_MEAN, CIFAR10_STD, Dataset

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import gpu_check  # noqa: E402  (benchmarks/ is not a package)
import make_gpu_subset  # noqa: E402

STAGE_NAMES = [stage.name for stage in gpu_check.STAGES]
SMOKE_TIMEOUT_S = 600
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def random_subset(path: Path, train_per_class: int = 20, test_per_class: int = 10) -> Path:
    """A subset file of random images in the carried format."""
    generator = torch.Generator().manual_seed(0)

    def images(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)

    n, m = 10 * train_per_class, 10 * test_per_class
    dataset = Dataset("random", images(n), torch.arange(n) % 10, images(m), torch.arange(m) % 10, CIFAR10_CLASSES,
                      CIFAR10_MEAN, CIFAR10_STD)
    make_gpu_subset.save_subset(path, dataset)
    return path


def imagefolder_zip(tmp_path: Path) -> Path:
    """A tiny CIFAR-shaped ImageFolder zip (train/<class>/, test/<class>/), for the accuracy stage."""
    tree = write_imagefolder(tmp_path / "tree", classes=CIFAR10_CLASSES[:4], train_per_class=4, test_per_class=2)
    archive = tmp_path / "tiny-cifar.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(tree.rglob("*.png")):
            zf.write(path, path.relative_to(tree))
    return archive


def run_check(*args: str, smoke: bool = True) -> subprocess.CompletedProcess:
    """Run the check as a user would, from the repo root."""
    command = [sys.executable, str(BENCHMARKS / "gpu_check.py"), *(["--smoke"] if smoke else []), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S, cwd=BENCHMARKS.parent)


def status_rows(stdout: str) -> dict[str, str]:
    """Each stage's status as the table prints it."""
    return dict(re.findall(r"^(\S+)\s+status\s+(.+)$", stdout, flags=re.M))


def test_smoke_run_measures_every_stage(tmp_path):
    out = tmp_path / "out"
    done = run_check("--out", str(out), "--subset", str(random_subset(tmp_path / "subset.npz")),
                     "--full-cifar", str(imagefolder_zip(tmp_path)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert list(status_rows(done.stdout)) == STAGE_NAMES
    assert all(status.startswith("ok") for status in status_rows(done.stdout).values())
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["smoke"] and summary["failed"] == []
    results = {stage["name"]: stage["results"] for stage in summary["stages"]}
    rates = {f"{name}.{key}": value for name, values in results.items() for key, value in values.items()
             if key.endswith("_per_s")}
    assert len(rates) == 6 and all(value > 0 for value in rates.values()), rates
    grand, train18, train50 = results["grand"], results["train-resnet18"], results["train-resnet50"]
    assert grand["hooks_vs_plain_throughput"] > 0 and grand["hooks_vs_vmap_max_rel_diff"] < 1e-5
    assert train18["compiled_path"] == "compile+autocast+channels_last" and train18["compile_s"] >= 0
    assert train50["classes"] == 100 and "compiled_images_per_s" not in train50
    determinism = results["determinism"]
    for flag in ("el2n_equal", "grand_equal", "weights_equal", "predictions_equal"):
        assert determinism[flag] is True  # one process, one thread count: the CPU repeats itself bit for bit
    assert determinism["weights_max_abs_diff"] == 0 and determinism["predictions_differing"] == 0
    for study in ("cifar10-resnet18-fast", "cifar100-resnet50-fast"):
        assert results["projection"][f"{study}.hours"] > 0 and results["projection"][f"{study}.jobs"] == 95
    assert 0 <= results["accuracy"]["test_accuracy"] <= 1 and results["accuracy"]["epochs"] == 1
    for name in STAGE_NAMES:
        assert (out / f"{name}.log").is_file() and (out / f"{name}.json").is_file()


@pytest.mark.parametrize("mode, status", [("crash", "CRASHED: SIGSEGV"),
                                          ("raise", "FAILED (exit 1): RuntimeError: failure injected")])
def test_a_failing_stage_is_named_and_the_next_one_still_runs(tmp_path, mode, status):
    out = tmp_path / "out"
    done = run_check("--out", str(out), "--only", "env,grand", "--fail-stage", f"env:{mode}")
    assert done.returncode == gpu_check.EXIT_FAILED
    rows = status_rows(done.stdout)
    assert rows["env"].startswith(status) and rows["grand"].startswith("ok")
    assert "FAILED: env;" in done.stdout
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["failed"] == ["env"]
    assert summary["stages"][1]["results"]["hooks_examples_per_s"] > 0


def test_a_hung_stage_is_stopped_by_its_watchdog_with_its_stack(tmp_path):
    out = tmp_path / "out"
    done = run_check("--out", str(out), "--only", "grand", "--fail-stage", "grand:hang", "--budget", "22")
    assert done.returncode == gpu_check.EXIT_FAILED
    assert status_rows(done.stdout)["grand"].startswith("HUNG: stopped by its watchdog")
    log = (out / "grand.log").read_text()
    assert gpu_check.WATCHDOG_MARK in log and "in inject" in log


def test_without_cuda_the_real_check_stops_after_env(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = run_check("--out", str(tmp_path / "out"), "--only", "env,grand", smoke=False)
    assert done.returncode == gpu_check.EXIT_NO_CUDA
    rows = status_rows(done.stdout)
    assert rows["env"].startswith("ok") and rows["grand"] == "not run: no CUDA device"
