"""The host KV pool: one shared-memory segment, one partition per stage, belonging to the stack.

Design note: the KV-cache manager creates the segment (or maps it again after its own restart) and workers
only map it; no process's exit removes it, so KV that was swapped out outlives a worker restart and a
restarted manager finds the segment the workers still map. The launcher removes it when its stack stops;
processes run alone leave it to their container's IPC namespace or to the operator (docs/DEPLOY.md). A partition is page-aligned so that a CUDA worker can
page-lock exactly its own slice with cudaHostRegister.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from multiprocessing import resource_tracker, shared_memory

import numpy as np
import torch

_ALIGN = 4096  # bytes; partitions start on page boundaries
SHM_DIR = Path("/dev/shm")  # where POSIX shared memory lives on Linux


def shm_free_bytes(where: Path = SHM_DIR) -> int | None:
    """Bytes free in the shared-memory filesystem; None where there is none to ask (not Linux)."""
    try:
        st = os.statvfs(where)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def shm_room(name: str, where: Path = SHM_DIR) -> tuple[int, int]:
    """(bytes the segment already holds, bytes free) in the shared-memory filesystem."""
    free = shm_free_bytes(where)
    if free is None:
        raise OSError(f"cannot read the free space of {where}")
    try:
        held = os.stat(where / name).st_blocks * 512
    except FileNotFoundError:
        held = 0
    return held, free


def shm_shortfall(need: int, held: int, free: int, block_bytes: int, where: Path = SHM_DIR) -> str | None:
    """Why a host pool of `need` bytes cannot be backed by `held + free` bytes of shared memory, or None.

    Its pages are only taken when first touched, so an oversized pool is created fine and then ends a
    process with SIGBUS in the middle of serving: the KV manager checks before it creates the pool and
    every worker before it maps it."""
    if need <= held + free:
        return None
    fit = max(0, (held + free) // max(block_bytes, 1))
    gib = 2**30
    return (f"the host KV pool needs {need / gib:.2f} GiB of shared memory but {where} can give it "
            f"{(held + free) / gib:.2f} GiB: lower cache.num_host_blocks to {fit} or less, or give "
            f"{where} more room (compose: shm_size of the kvcache service; docker run: --shm-size)")


class HostPoolError(RuntimeError):
    """The segment is missing, already exists, or does not match the expected layout."""


@dataclass(frozen=True)
class HostPoolLayout:
    """Where each stage's [num_host_blocks, *block_shape] partition sits in the segment."""

    num_host_blocks: int
    block_shapes: tuple[tuple[int, ...], ...]  # per stage: shape of one block (layers, 2, block_size, heads, head_dim)
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if self.num_host_blocks < 0:
            raise HostPoolError(f"num_host_blocks must be >= 0, not {self.num_host_blocks}")
        if not self.block_shapes or any(not s or min(s) <= 0 for s in self.block_shapes):
            raise HostPoolError(f"every stage needs a block shape of positive sizes, got {self.block_shapes}")

    @classmethod
    def from_config(cls, config) -> "HostPoolLayout":
        """The layout the model in `config` needs (stages may differ in layer count, hence in block size)."""
        from common.model.layout import block_shape, stage_layers
        from common.model.spec import load_spec

        spec = load_spec(config.model.path)
        ranges = stage_layers(spec.num_layers, config.parallel.num_stages)
        shapes = tuple(block_shape(spec, lo, hi, config.cache.block_size) for lo, hi in ranges)
        return cls(config.cache.num_host_blocks, shapes, getattr(torch, config.model.dtype))

    @property
    def num_stages(self) -> int:
        return len(self.block_shapes)

    def block_bytes(self, stage: int) -> int:
        return math.prod(self.block_shapes[stage]) * torch.empty((), dtype=self.dtype).element_size()

    def offset(self, stage: int) -> int:
        return sum(_aligned(self.num_host_blocks * self.block_bytes(k)) for k in range(stage))

    @property
    def nbytes(self) -> int:
        return max(1, self.offset(self.num_stages))  # shared memory cannot be empty


class HostPool:
    """A mapped host pool segment; `create` in the KV-cache manager, `attach` in workers."""

    def __init__(self, shm: shared_memory.SharedMemory, layout: HostPoolLayout, owner: bool) -> None:
        self._shm, self.layout, self.owner = shm, layout, owner
        self.name = shm.name
        if shm.size < layout.nbytes:
            shm.close()
            raise HostPoolError(
                f"host pool {self.name!r} is {shm.size} bytes but this config needs {layout.nbytes}; "
                "it was created for another model or cache config"
            )

    @classmethod
    def create(cls, name: str, layout: HostPoolLayout, replace: bool = False) -> "HostPool":
        """Make the segment. replace=True first removes a leftover one of that name (a crashed stack's)."""
        if replace:
            _unlink_quietly(name)
        free = shm_free_bytes()
        block_bytes = sum(layout.block_bytes(k) for k in range(layout.num_stages))
        message = None if free is None else shm_shortfall(layout.nbytes, 0, free, block_bytes)
        if message:
            raise HostPoolError(message)
        try:
            shm = shared_memory.SharedMemory(name=name, create=True, size=layout.nbytes)
        except FileExistsError:
            raise HostPoolError(
                f"host pool {name!r} already exists: another stack uses it, or a crashed one left it; "
                "set endpoints.host_pool to another name, or create with replace=True"
            ) from None
        return cls(shm, layout, owner=True)

    @classmethod
    def open_for_stack(cls, name: str, layout: HostPoolLayout) -> "HostPool":
        """The KV manager's pool: the stack's segment if one of this size exists (a restarted manager maps
        the one the workers still map), else a new one. Either way no process's exit removes it, the
        manager's included; `remove` does, when the whole stack stops (docs/DEPLOY.md)."""
        try:
            pool = cls.attach(name, layout)
        except HostPoolError:
            _unlink_quietly(name)  # absent, or a leftover of another size that no worker of this config maps
            pool = cls.create(name, layout)
            resource_tracker.unregister(pool._shm._name, "shared_memory")  # type: ignore[attr-defined]
            pool.owner = False
        return pool

    @staticmethod
    def remove(name: str) -> None:
        """Unlink the stack's segment (the launcher, when its stack stops); absent is fine."""
        _unlink_quietly(name)

    @classmethod
    def attach(cls, name: str, layout: HostPoolLayout) -> "HostPool":
        """Map an existing segment without taking ownership: this process exiting leaves it in place."""
        try:
            shm = _open_untracked(name)
        except FileNotFoundError:
            raise HostPoolError(f"host pool {name!r} does not exist; the KV-cache manager creates it") from None
        return cls(shm, layout, owner=False)

    def view(self, stage: int) -> torch.Tensor:
        """Stage `stage`'s partition as a tensor [num_host_blocks, *block_shape], sharing the memory."""
        if not 0 <= stage < self.layout.num_stages:
            raise HostPoolError(f"stage {stage} is out of range for {self.layout.num_stages} stage(s)")
        if self._shm.buf is None:
            raise HostPoolError(f"host pool {self.name!r} is closed")
        count = self.layout.num_host_blocks * self.layout.block_bytes(stage)
        raw = np.ndarray((count,), dtype=np.uint8, buffer=self._shm.buf, offset=self.layout.offset(stage))
        shape = (self.layout.num_host_blocks, *self.layout.block_shapes[stage])
        return torch.from_numpy(raw).view(self.layout.dtype).view(shape)

    def close(self) -> None:
        """Unmap (and, for the creator, remove the name). Views still alive keep their memory mapped."""
        if self.owner:
            try:
                self._shm.unlink()
            except FileNotFoundError:
                pass  # someone removed it by hand; nothing left to clean
        try:
            self._shm.close()
        except BufferError:
            pass  # a tensor view is still alive; the mapping goes away with the last view

    def __enter__(self) -> "HostPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _open_untracked(name: str) -> shared_memory.SharedMemory:
    try:
        return shared_memory.SharedMemory(name=name, track=False)  # Python >= 3.13
    except TypeError:
        shm = shared_memory.SharedMemory(name=name)
        # Before 3.13 attaching registers the segment with this process's resource tracker, which
        # would unlink it when the worker exits and take the swapped-out KV with it.
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        return shm


def _unlink_quietly(name: str) -> None:
    try:
        shm = shared_memory.SharedMemory(name=name)
    except FileNotFoundError:
        return
    shm.close()
    shm.unlink()  # also drops the registration the open above made
