"""Opening a worker's copy executor at start: CuPy, room in /dev/shm, the host pool mapped and page-locked.

Design note: everything that can fail is done before the worker announces itself ready, so a missing
dependency or a pool that cannot fit stops the worker at start with one line, and registering tens of
GB never stalls a stage in the middle of serving. The KV manager creates the pool; a worker started
before it (`fastserve up` starts workers first) waits a bounded time for the segment to appear.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from common.hostpool import SHM_DIR, shm_room, shm_shortfall
from workers.copy_executor.base import CopyError

HOST_POOL_WAIT_S = 120.0  # how long a worker waits for the KV manager to create the host pool
HOST_POOL_POLL_S = 0.05


def cupy_wheel(torch_cuda: str | None) -> str:
    """The CuPy package built for torch's CUDA major (cupy-cuda13x for a CUDA 13 torch)."""
    major = (torch_cuda or "13").split(".")[0]
    return f"cupy-cuda{major}x"


def import_cupy(torch_cuda: str | None = None) -> Any:
    """CuPy, checked against torch's CUDA major; a CopyError in one line that says what to install."""
    torch_cuda = torch_cuda if torch_cuda is not None else torch.version.cuda
    wheel = cupy_wheel(torch_cuda)
    try:
        import cupy
    except ImportError as e:
        raise CopyError(f"model.device=cuda needs CuPy for the KV copies and it is not importable ({e}); "
                        f"`make gpu` installs {wheel}, which matches torch's CUDA {torch_cuda}") from None
    try:
        major = cupy.cuda.runtime.runtimeGetVersion() // 1000
    except Exception as e:  # CuPy's CUDA runtime failed to load: a driver or library problem, say which
        raise CopyError(f"CuPy is installed but its CUDA runtime does not load ({type(e).__name__}: {e}); "
                        f"install {wheel} to match torch's CUDA {torch_cuda}") from None
    if torch_cuda and int(torch_cuda.split(".")[0]) != major:
        raise CopyError(f"CuPy is built for CUDA {major} but torch for CUDA {torch_cuda}: two CUDA runtimes in one "
                        f"process; replace it with {wheel}")
    return cupy


def check_shm_room(need: int, held: int, free: int, block_bytes: int, where: Path = SHM_DIR) -> None:
    """Refuse a host pool that /dev/shm cannot back (the rule is `common.hostpool.shm_shortfall`)."""
    message = shm_shortfall(need, held, free, block_bytes, where)
    if message:
        raise CopyError(message)


def wait_for_segment(name: str, timeout_s: float = HOST_POOL_WAIT_S, where: Path = SHM_DIR,
                     sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> None:
    """Return once the KV manager has created the segment; a CopyError after timeout_s.

    The KV manager has no channel to a worker before its first batch, and that batch is too late to
    pin tens of GB, so the worker looks for the segment itself, at start only.
    """
    deadline = clock() + timeout_s
    while not (where / name).exists():
        if clock() >= deadline:
            raise CopyError(f"the host KV pool {name!r} did not appear in {where} within {timeout_s:.0f} s; start the "
                            "kvcache service (it creates the pool), or set cache.num_host_blocks=0 to run without it")
        sleep(HOST_POOL_POLL_S)


def open_executor(config: Any, stage: int, device_pool: torch.Tensor, cupy: Any = None,
                  timeout_s: float | None = None) -> Any:
    """The stage's copy executor over its partition of the host pool, mapped and (on CUDA) page-locked."""
    from common.hostpool import HostPool, HostPoolLayout
    from workers.copy_executor import make_executor

    layout = HostPoolLayout.from_config(config)
    name = config.endpoints.host_pool
    wait_for_segment(name, HOST_POOL_WAIT_S if timeout_s is None else timeout_s)
    held, free = shm_room(name)
    check_shm_room(layout.nbytes, held, free, sum(layout.block_bytes(k) for k in range(layout.num_stages)))
    pool = HostPool.attach(name, layout)
    executor = make_executor(device_pool, pool.view(stage), cupy=cupy)
    executor.host_pool_handle = pool  # keep the mapping alive as long as the executor
    return executor


def gpu_problem() -> str:
    """Why this environment cannot serve on a GPU, in one line ("" when torch sees a GPU and CuPy matches it)."""
    from workers.model.runner import cuda_unusable

    why = cuda_unusable()
    if why:
        return why
    try:
        import_cupy()
    except CopyError as e:
        return str(e)
    return ""


if __name__ == "__main__":  # `make gpu` ends with this check
    problem = gpu_problem()
    raise SystemExit(f"make gpu: {problem}" if problem else print("make gpu: torch sees the GPU and CuPy matches its CUDA"))
