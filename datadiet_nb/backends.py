"""How a device runs the package's work: the GPU path's switches, float32 precision and determinism settings.

On CUDA the training step runs under bf16 autocast, on channels_last tensors, compiled when the recipe asks;
evaluation and scoring run in strict IEEE float32 (no TF32). Setting ``DATADIET_GPU_PATH_ON_CPU=1`` takes
the same path on the CPU (inductor compiles there too), so that the tests run every line of it without a GPU.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass
from typing import Iterator

import torch

GPU_PATH_ENV = "DATADIET_GPU_PATH_ON_CPU"
# cuBLAS needs a fixed workspace to give the same bits run after run (set before its first use in the process)
CUBLAS_WORKSPACE = ":4096:8"


@dataclass(frozen=True)
class DevicePath:
    """The training step's form on a device: compiled, bf16 autocast, channels_last."""

    compile: bool
    autocast: bool
    channels_last: bool

    @classmethod
    def of(cls, device: torch.device, compile_requested: bool) -> "DevicePath":
        """The GPU path on CUDA (or on the CPU with ``DATADIET_GPU_PATH_ON_CPU=1``), else plain eager float32."""
        gpu = device.type == "cuda" or os.environ.get(GPU_PATH_ENV) == "1"
        return cls(compile=compile_requested and gpu, autocast=gpu, channels_last=gpu)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def describe(self) -> dict:
        return asdict(self)


def configure_determinism() -> None:
    """Ask CUDA for reproducible kernels: cuDNN deterministic and not autotuned, a fixed cuBLAS workspace.

    ``use_deterministic_algorithms`` is left off: with it an op lacking a deterministic CUDA kernel raises or
    warns on every call. What these settings give is measured by ``benchmarks/gpu_check.py`` (two runs with a
    seed, compared) and said in the book; on the CPU, runs are bit for bit equal at equal thread counts.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def _precision_handles() -> list:
    """The fp32-precision settings of the ops that can use TF32: cuDNN convolutions and cuBLAS matmuls."""
    return [torch.backends.cudnn.conv, torch.backends.cuda.matmul]


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """IEEE float32 convolutions and matmuls for the block (this torch defaults cuDNN convolutions to TF32),
    then the settings as before. Only the ``fp32_precision`` API is used: torch raises when the old
    ``allow_tf32`` flags are read after it."""
    handles = _precision_handles()
    before = [h.fp32_precision for h in handles]
    for h in handles:
        h.fp32_precision = "ieee"
    try:
        yield
    finally:
        for h, value in zip(handles, before):
            h.fp32_precision = value


def settings() -> dict:
    """The backend settings in force, for provenance."""
    return {"cudnn_deterministic": torch.backends.cudnn.deterministic, "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            "conv_fp32_precision": torch.backends.cudnn.conv.fp32_precision,
            "matmul_fp32_precision": torch.backends.cuda.matmul.fp32_precision,
            "gpu_path_on_cpu": os.environ.get(GPU_PATH_ENV) == "1"}
