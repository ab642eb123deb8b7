"""The notebook executor's warm kernels: each notebook sees a fresh kernel's state, records of notebooks run at
once on a pool of kernels equal a fresh kernel's bit for bit (same torch threads), the outputs too apart from
timings, and a notebook that kills its kernel costs only itself."""

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
import pytest
from papermill.exceptions import PapermillExecutionError

from datadiet_nb.executors.notebooks import KernelPool, WarmKernel, execute_notebook
from datadiet_nb.experiment import compute_scores, load_dataset
from datadiet_nb.store import Store

OVERRIDES = ["recipe.epochs=2", "scoring.num_runs=1", "scoring.epoch=1", "sparsities=0,0.5", "seeds=0,1"]
RUNS = [("el2n", 0.5, 0), ("random", 0.5, 1)]  # by a score and at random, two seeds

# What a notebook can see of the kernel's state, printed; then everything it can change, changed. It imports
# what every run notebook imports through the package first, as the warm kernel has (their warning filters).
LOOK = """
import logging, os, sys, warnings
import pandas, seaborn, scipy.stats
import matplotlib, matplotlib.pyplot as plt, torch
user = sorted(k for k in globals() if not k.startswith("_") and k not in {"In", "Out", "get_ipython", "exit", "quit",
              "open", "logging", "os", "sys", "warnings", "matplotlib", "plt", "torch", "pandas", "seaborn",
              "scipy"})
print(user, os.environ.get("DATADIET_LEAK"), os.getcwd(), sys.path[-1], len(warnings.filters),
      logging.getLogger("datadiet_nb").level, len(logging.root.handlers), torch.get_num_threads(),
      torch.initial_seed() == 123, torch.backends.cudnn.conv.fp32_precision, plt.get_fignums(),
      matplotlib.rcParams["lines.linewidth"], "datadiet_nb.store" in sys.modules)
import numpy
print(torch.get_default_dtype(), torch.is_grad_enabled(), torch.are_deterministic_algorithms_enabled(),
      torch.is_anomaly_enabled(), torch.backends.cudnn.enabled, numpy.geterr()["divide"],
      numpy.get_printoptions()["precision"], pandas.get_option("display.max_rows"), "leaky_module" in sys.modules)
"""
CHANGE = """
import datadiet_nb.store, pathlib, random, numpy, tempfile
leaked = 1
os.environ["DATADIET_LEAK"] = "1"; os.chdir("/"); sys.path.append("/leak"); warnings.simplefilter("ignore")
logging.getLogger("datadiet_nb").setLevel(logging.DEBUG); logging.root.addHandler(logging.NullHandler())
torch.set_num_threads(1); torch.manual_seed(123); torch.backends.cudnn.conv.fp32_precision = "ieee"
plt.figure(); matplotlib.rcParams["lines.linewidth"] = 9
torch.set_default_dtype(torch.float64); torch.set_grad_enabled(False); torch.use_deterministic_algorithms(True)
torch.autograd.set_detect_anomaly(True); torch.backends.cudnn.enabled = False
numpy.seterr(divide="raise"); numpy.set_printoptions(precision=2); pandas.set_option("display.max_rows", 3)
folder = tempfile.mkdtemp(); pathlib.Path(folder, "leaky_module.py").write_text("X = 1")
sys.path.insert(0, folder); import leaky_module
"""


def notebook_of(path: Path, *sources: str) -> Path:
    cells = [nbformat.v4.new_code_cell(source) for source in sources]
    nbformat.write(nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": {
        "name": "python3", "language": "python", "display_name": "Python 3"}}), path)
    return path


def first_output(path: Path) -> str:
    return nbformat.read(path, 4).cells[0].outputs[0]["text"]


def test_each_notebook_in_a_warm_kernel_sees_what_a_fresh_kernel_shows(tmp_path):
    source = notebook_of(tmp_path / "leaky.ipynb", LOOK, CHANGE)
    execute_notebook(source, tmp_path / "fresh.ipynb", {}, scratch=tmp_path / "scratch")
    with WarmKernel() as kernel:
        for i in range(2):
            execute_notebook(source, tmp_path / f"warm{i}.ipynb", {}, scratch=tmp_path / "scratch", kernel=kernel)
    fresh = first_output(tmp_path / "fresh.ipynb")
    assert "None" in fresh and "False" in fresh  # no leak variable, no package module: what the check looks for
    assert first_output(tmp_path / "warm0.ipynb") == first_output(tmp_path / "warm1.ipynb") == fresh
    counts = [c.execution_count for c in nbformat.read(tmp_path / "warm1.ipynb", 4).cells]
    assert counts == [1, 2]


def test_a_notebook_that_kills_its_kernel_fails_alone(tmp_path):
    dying = notebook_of(tmp_path / "dying.ipynb", "import os\nos._exit(1)")
    fine = notebook_of(tmp_path / "fine.ipynb", "print(6 * 7)")
    with WarmKernel() as kernel:
        with pytest.raises((PapermillExecutionError, RuntimeError)):
            execute_notebook(dying, tmp_path / "dying-out.ipynb", {}, scratch=tmp_path / "scratch", kernel=kernel)
        execute_notebook(fine, tmp_path / "fine-out.ipynb", {}, scratch=tmp_path / "scratch", kernel=kernel)
    assert first_output(tmp_path / "fine-out.ipynb") == "42\n"


def comparable(record: dict) -> dict:
    """A run record without what measures time (seconds, creation time)."""
    record = {k: v for k, v in record.items() if k not in ("seconds", "created", "checksum")}
    record["train"] = {k: v for k, v in record["train"].items() if k != "seconds"}
    return record


def test_run_notebooks_on_a_pool_of_warm_kernels_record_what_fresh_kernels_record(tmp_path, monkeypatch):
    """The same run notebooks, fresh one after another in one store, and in the reverse order two at a time on a
    pool of two warm kernels in another: equal records (one torch thread in every kernel)."""
    from datadiet_nb import presets

    preset = presets.with_overrides(presets.get("digits"), OVERRIDES)
    reference = Store(tmp_path / "scored")
    compute_scores(preset, load_dataset(preset), reference)
    stores = {name: tmp_path / name for name in ("fresh", "warm")}
    for root in stores.values():
        shutil.copytree(reference.root, root)

    def run(name: str, runs, kernel=None):
        for score, sparsity, seed in runs:
            parameters = {"preset": "digits", "store": str(stores[name]), "overrides": OVERRIDES, "score": score,
                          "sparsity": sparsity, "seed": seed}
            execute_notebook("train_sparse", tmp_path / f"{name}-{score}-{sparsity}-{seed}.ipynb", parameters,
                             scratch=tmp_path / "scratch", kernel=kernel)

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what a pool kernel of one thread starts with
    run("fresh", RUNS)
    monkeypatch.delenv("OMP_NUM_THREADS")
    with KernelPool(2, threads=1) as pool, ThreadPoolExecutor(2) as threads:
        for done in [threads.submit(run, "warm", [job], pool) for job in RUNS[::-1]]:
            done.result()
        assert all(kernel.used == 1 for kernel in pool.kernels)  # the two ran on two kernels
    records = {name: {p.name: comparable(json.loads(p.read_text())) for p in (root / "runs").glob("*.json")}
               for name, root in stores.items()}
    assert len(records["fresh"]) == len(RUNS) and records["warm"] == records["fresh"]
    assert {record["provenance"]["torch_threads"] for record in records["warm"].values()} == {1}
    for score, sparsity, seed in RUNS:
        outputs = [[cell.get("outputs") for cell in nbformat.read(tmp_path / f"{name}-{score}-{sparsity}-{seed}.ipynb",
                                                                   4).cells if cell.cell_type == "code"]
                   for name in stores]
        assert outputs[0] == outputs[1]
