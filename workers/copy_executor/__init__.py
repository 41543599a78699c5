"""Swap-op copy executors for stage workers: a CPU thread backend and a CUDA (CuPy stream) backend."""

from __future__ import annotations

from typing import Any

import torch

from workers.copy_executor.base import CopyError, CopyExecutor
from workers.copy_executor.cpu import CpuCopyExecutor
from workers.copy_executor.overlap import CopyStats


def make_executor(device_pool: torch.Tensor, host_pool: torch.Tensor, compute_stream: Any = None,
                  cupy: Any = None) -> CopyExecutor:
    """The backend that fits where the device pool lives (CuPy is imported only for CUDA pools)."""
    if device_pool.device.type == "cuda":
        from workers.copy_executor.cuda import CudaCopyExecutor

        return CudaCopyExecutor(device_pool, host_pool, compute_stream, cupy)
    return CpuCopyExecutor(device_pool, host_pool)


__all__ = ["CopyError", "CopyExecutor", "CopyStats", "CpuCopyExecutor", "make_executor"]
