"""Helpers shared by the benchmark scripts: the device, a description of the machine, timing, JSON output."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]


def pick_device(requested: str = "auto") -> str:
    """``requested``, or for ``auto`` CUDA when there is a GPU and the CPU otherwise."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def synchronize(device: str) -> None:
    """Wait for the device's queued work, so that a wall-clock time covers it (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def seconds_of(fn: Callable[[], object], device: str) -> float:
    """Wall-clock seconds of one call of ``fn``, including the device work it queued."""
    synchronize(device)
    started = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - started


def git_commit() -> dict:
    """The checkout's commit and whether it has uncommitted changes (None when git is not available)."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def describe_machine(device: str) -> dict:
    """What the figures depend on: device name, torch version, CPU threads, and the code's commit."""
    name = (torch.cuda.get_device_name(device) if torch.device(device).type == "cuda"
            else platform.processor() or platform.machine())
    return {"device": name, "torch": torch.__version__, "threads": torch.get_num_threads(), **git_commit()}


def write_json(script: str, payload: dict) -> Path:
    """Write ``payload`` as JSON next to the benchmark script (``grand.py`` -> ``grand.json``)."""
    out = Path(script).with_suffix(".json")
    out.write_text(json.dumps(payload, indent=1) + "\n")
    return out
