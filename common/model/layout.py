"""Pipeline stage split and the geometry of one paged KV block."""

from __future__ import annotations

from common.model.spec import ModelError, ModelSpec


def stage_layers(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    """Balanced [lo, hi) layer ranges, one per stage; earlier stages take the remainder."""
    if num_stages <= 0:
        raise ModelError(f"num_stages must be > 0, not {num_stages}")
    if num_stages > num_layers:
        raise ModelError(f"cannot split {num_layers} layers into {num_stages} stages; use at most {num_layers} stages")
    base, extra = divmod(num_layers, num_stages)
    ranges, lo = [], 0
    for k in range(num_stages):
        hi = lo + base + (1 if k < extra else 0)
        ranges.append((lo, hi))
        lo = hi
    return ranges


def block_shape(spec: ModelSpec, lo: int, hi: int, block_size: int) -> tuple[int, ...]:
    """Shape of one block: K and V of layers [lo, hi) for block_size tokens, one contiguous region.

    The pool of a stage is a tensor [num_blocks, *block_shape] = [num_blocks, layers, 2 (K, V),
    kv_heads, block_size, head_dim]. Layers sit inside the block so that swapping a job's block is one
    contiguous copy however many layers the stage has; tokens sit inside each head so that a job's
    gathered K is already [kv_heads, tokens, head_dim], the layout attention reads.
    """
    if not 0 <= lo < hi <= spec.num_layers:
        raise ModelError(f"layer range [{lo}, {hi}) is not inside [0, {spec.num_layers})")
    if block_size <= 0:
        raise ModelError(f"block_size must be > 0, not {block_size}")
    return (hi - lo, 2, spec.num_kv_heads, block_size, spec.head_dim)


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks that hold num_tokens tokens."""
    return -(-num_tokens // block_size)
