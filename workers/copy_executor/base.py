"""The copy executor interface shared by the CPU (thread) and CUDA (CuPy stream) backends."""

from __future__ import annotations

import abc
from collections.abc import Iterable
from typing import Any

import torch

from workers.copy_executor.overlap import CopyStats


class CopyError(RuntimeError):
    """An op was malformed, or the copy engine failed (the worker must report it and stop)."""


def op_direction(op: Any) -> str:
    """'out' (device -> host) or 'in' (host -> device); accepts the planner's enum or the wire string."""
    direction = getattr(op.direction, "value", op.direction)
    if direction not in ("out", "in"):
        raise CopyError(f"op {op.op_id}: direction must be 'out' or 'in', not {op.direction!r}")
    return direction


def block_runs(src: Iterable[int], dst: Iterable[int]) -> list[tuple[int, int, int]]:
    """(src_start, dst_start, count) for maximal runs where both ids advance by one: one memcpy each."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst):
        if runs and s == runs[-1][0] + runs[-1][2] and d == runs[-1][1] + runs[-1][2]:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


class CopyExecutor(abc.ABC):
    """Runs swap ops between a device pool and a host pool of the same block shape, in submission order.

    Ops are anything with op_id, job_id, direction ('out'/'in'), src_blocks and dst_blocks (the planner's
    SwapOp or the wire message). Acks come back from poll(); compute_begin()/compute_end() bracket each
    batch's compute so the executor can measure how much copy time it hid.
    """

    def __init__(self, device_pool: torch.Tensor, host_pool: torch.Tensor) -> None:
        if device_pool.shape[1:] != host_pool.shape[1:] or device_pool.dtype != host_pool.dtype:
            raise CopyError(
                f"pool blocks differ: device {tuple(device_pool.shape[1:])} {device_pool.dtype}, "
                f"host {tuple(host_pool.shape[1:])} {host_pool.dtype}"
            )
        if not device_pool.is_contiguous() or not host_pool.is_contiguous():
            raise CopyError("both pools must be contiguous tensors")
        self.device_pool, self.host_pool = device_pool, host_pool
        self.block_bytes = device_pool[0].numel() * device_pool.element_size() if len(device_pool) else 0

    def check(self, op: Any) -> tuple[str, list[int], list[int]]:
        """Validate an op against the pools; returns (direction, src ids, dst ids)."""
        direction = op_direction(op)
        src, dst = [int(i) for i in op.src_blocks], [int(i) for i in op.dst_blocks]
        if len(src) != len(dst):
            raise CopyError(f"op {op.op_id}: {len(src)} source blocks but {len(dst)} destination blocks")
        src_pool, dst_pool = (self.device_pool, self.host_pool) if direction == "out" else (self.host_pool, self.device_pool)
        for ids, pool, what in ((src, src_pool, "source"), (dst, dst_pool, "destination")):
            if ids and (min(ids) < 0 or max(ids) >= len(pool)):
                raise CopyError(f"op {op.op_id}: {what} block ids {ids} fall outside a pool of {len(pool)} blocks")
        if len(set(dst)) != len(dst):
            raise CopyError(f"op {op.op_id}: a destination block appears twice")
        return direction, src, dst

    @abc.abstractmethod
    def submit(self, op: Any) -> None:
        """Queue an op behind every op submitted before it."""

    @abc.abstractmethod
    def poll(self) -> list[int]:
        """Ids of ops completed since the last poll, in completion (= submission) order; never blocks."""

    @abc.abstractmethod
    def wait_for(self, job_ids: Iterable[Any]) -> None:
        """Make the coming compute wait until every submitted op of these jobs has landed."""

    @abc.abstractmethod
    def compute_begin(self) -> None:
        """The worker starts the compute of a batch."""

    @abc.abstractmethod
    def compute_end(self) -> None:
        """The worker has issued the whole compute of that batch."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Block until every submitted op has completed (shutdown, tests, worker restart)."""

    @abc.abstractmethod
    def stats(self) -> CopyStats:
        """Totals since construction (acked ops only)."""

    def close(self) -> None:
        """Finish submitted ops and release resources."""
        self.flush()

    def __enter__(self) -> "CopyExecutor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
