"""What produced a result: package, library versions, hardware, git commit."""

from __future__ import annotations

import os
import platform
import subprocess
from functools import lru_cache
from pathlib import Path

import torch

from . import CODE_VERSION, __version__
from .backends import configure_determinism, settings


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the checkout the package runs from (with ``-dirty`` if modified), or None."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return commit.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def provenance(device: torch.device | str = "cpu") -> dict:
    """Versions, hardware and commit, recorded with every stored artefact."""
    import numpy

    device = torch.device(device)
    return {
        "datadiet_nb": __version__, "code_version": CODE_VERSION, "git_commit": git_commit(),
        "python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "device": str(device), "device_name": device_name(device),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "backends": settings(),
    }


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; a CUDA device gets the determinism settings before any work."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else torch.device(name)
    if device.type == "cuda":
        configure_determinism()
    return device
