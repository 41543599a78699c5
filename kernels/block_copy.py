"""Block copy: move whole KV blocks (first dimension) between two pools of the same block shape."""

from __future__ import annotations

from typing import Sequence

import torch


def _index(ids: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(ids, torch.Tensor):
        return ids.to(device=device, dtype=torch.long)
    return torch.tensor(list(ids), dtype=torch.long, device=device)


def copy_blocks(src: torch.Tensor, dst: torch.Tensor, src_ids: Sequence[int] | torch.Tensor,
                dst_ids: Sequence[int] | torch.Tensor, non_blocking: bool = False) -> None:
    """dst[dst_ids[i]] = src[src_ids[i]] for every i; src and dst may be the same pool or on different devices.

    Between two pools, runs of consecutive ids are copied as slices (one contiguous memcpy each, the
    common case for a job's blocks); within one pool, or for many scattered ids, one gather and one scatter.
    With non_blocking, slice copies are queued on the current CUDA stream and the caller synchronizes
    (records an event) before reading dst or reusing src.
    """
    if src.shape[1:] != dst.shape[1:] or src.dtype != dst.dtype:
        raise ValueError(f"block shapes differ: src {tuple(src.shape[1:])} {src.dtype}, dst {tuple(dst.shape[1:])} {dst.dtype}")
    s = [int(i) for i in (src_ids.tolist() if isinstance(src_ids, torch.Tensor) else src_ids)]
    d = [int(i) for i in (dst_ids.tolist() if isinstance(dst_ids, torch.Tensor) else dst_ids)]
    if len(s) != len(d):
        raise ValueError(f"copy_blocks got {len(s)} source ids and {len(d)} destination ids")
    if not s:
        return
    if min(s) < 0 or max(s) >= src.shape[0] or min(d) < 0 or max(d) >= dst.shape[0]:
        raise ValueError(f"block ids out of range: src pool has {src.shape[0]} blocks, dst pool {dst.shape[0]}")
    runs = _runs(s, d)
    if src.data_ptr() != dst.data_ptr() and len(runs) <= 8:
        for a, b, n in runs:
            dst[b:b + n].copy_(src[a:a + n], non_blocking=non_blocking)
        return
    # one pool (source and destination ids may overlap) or many scattered ids: gather once, move once, scatter once
    picked = src.index_select(0, _index(s, src.device))
    # a device-to-host temporary must be complete before the host scatter reads it
    picked = picked.to(dst.device, non_blocking=non_blocking and dst.device.type == "cuda")
    dst.index_copy_(0, _index(d, dst.device), picked)


def _runs(s: list[int], d: list[int]) -> list[tuple[int, int, int]]:
    """(src_start, dst_start, length) for maximal runs where both sides advance by one."""
    runs: list[tuple[int, int, int]] = []
    a, b, n = s[0], d[0], 1
    for x, y in zip(s[1:], d[1:]):
        if x == a + n and y == b + n:
            n += 1
        else:
            runs.append((a, b, n))
            a, b, n = x, y, 1
    runs.append((a, b, n))
    return runs
