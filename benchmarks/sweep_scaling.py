"""Wall time of a whole sweep on each executor: this process (inline) against Ray with 1 and 2 workers, or on a GPU
Ray with 1, 2 and 4 runs packed on the GPU at once.

    python benchmarks/sweep_scaling.py [--preset digits] [--set KEY=VALUE ...]
    python benchmarks/sweep_scaling.py --gpu [--preset cifar10-cpu --set device=cuda] [--gpus-per-job 1 0.5 0.25]

Each configuration runs ``datadiet-nb sweep --executor ... --quiet`` in a fresh process on a fresh
store, so the time includes Python's and Ray's start-up and the loading of the data, as a user sees
it. CPU: Ray's workers are as many as the machine's CPUs divided by ``--cpus-per-job`` (each with that
many torch threads); inline uses every CPU in one process. GPU: ``--gpus-per-job F`` lets 1/F runs
share the GPU; its utilisation is sampled every second with nvidia-smi. Prints a table with each
time's ratio to the first row and writes sweep_scaling.json next to this file.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from common import describe_machine, pick_device, write_json

UTILISATION_PERIOD_S = 1.0


def cpu_configurations() -> list[tuple[str, list[str]]]:
    cpus = os.cpu_count() or 1
    return [("inline", ["--executor", "inline"]),
            ("ray, 1 worker", ["--executor", "ray", "--cpus-per-job", str(cpus)]),
            (f"ray, {cpus} workers", ["--executor", "ray", "--cpus-per-job", "1"])]


def gpu_configurations(fractions: list[float]) -> list[tuple[str, list[str]]]:
    return [(f"ray, {round(1 / f)} runs per GPU", ["--executor", "ray", "--gpus-per-job", f"{f:g}"]) for f in fractions]


class Utilisation:
    """GPU utilisation (%) sampled by nvidia-smi in the background while a sweep runs."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(UTILISATION_PERIOD_S):
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip():
                self.samples.append(statistics.mean(float(v) for v in out.stdout.split()))

    def __enter__(self) -> "Utilisation":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def timed_sweep(options: list[str], preset: str, overrides: list[str], gpu: bool) -> dict:
    """Seconds of one sweep in a fresh process on a fresh store (and the GPU's mean utilisation)."""
    store = tempfile.mkdtemp(prefix="sweep-scaling-")
    command = [sys.executable, "-m", "datadiet_nb.cli", "sweep", "--preset", preset, "--store", store, "--quiet",
               *[f"--set={o}" for o in overrides], *options]
    try:
        with Utilisation() if gpu else _nothing() as utilisation:
            started = time.perf_counter()
            result = subprocess.run(command, capture_output=True, text=True)
            seconds = time.perf_counter() - started
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
        runs = sum(1 for _ in os.scandir(os.path.join(store, "runs")) if _.name.endswith(".json"))
    finally:
        shutil.rmtree(store, ignore_errors=True)
    row = {"seconds": seconds, "runs": runs}
    if gpu:
        row["gpu_utilisation_mean"] = statistics.mean(utilisation.samples) if utilisation.samples else None
    return row


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, help="default: digits, or with --gpu cifar10-cpu on CUDA")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="edit the preset")
    parser.add_argument("--gpu", action="store_true", help="runs per GPU instead of CPU workers")
    parser.add_argument("--gpus-per-job", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    args = parser.parse_args()
    preset = args.preset or ("cifar10-cpu" if args.gpu else "digits")
    overrides = args.set or (["device=cuda"] if args.gpu else [])
    configurations = gpu_configurations(args.gpus_per_job) if args.gpu else cpu_configurations()
    rows = []
    for name, options in configurations:
        row = {"executor": name, "options": options, **timed_sweep(options, preset, overrides, args.gpu)}
        rows.append(row)
        print(f"{name:24s} {row['seconds']:8.1f} s  {row['runs']} runs", flush=True)
    for row in rows:
        row["speed_vs_first"] = rows[0]["seconds"] / row["seconds"]
    print(f"\n{preset} sweep ({rows[0]['runs']} runs), wall time per executor:")
    print(f"{'executor':24s} {'seconds':>8s} {'speed-up':>9s}" + ("  GPU util %" if args.gpu else ""))
    for row in rows:
        util = f"  {row['gpu_utilisation_mean']:10.0f}" if args.gpu and row["gpu_utilisation_mean"] is not None else ""
        print(f"{row['executor']:24s} {row['seconds']:8.1f} {row['speed_vs_first']:8.2f}x{util}")
    out = write_json(__file__, {"preset": preset, "overrides": overrides, "cpus": os.cpu_count(),
                                "machine": describe_machine(pick_device("cuda" if args.gpu else "cpu")),
                                "results": rows})
    print(f"written to {out}")


if __name__ == "__main__":
    main()
