"""Fixed pool of numbered KV blocks: a free list with strict ownership checks."""

from __future__ import annotations

from collections.abc import Iterable


class AllocatorError(ValueError):
    """A block operation that would corrupt the pool (double free, foreign id, bad count)."""


class BlockAllocator:
    """Hands out block ids 0..num_blocks-1; every id is either free or owned exactly once."""

    def __init__(self, num_blocks: int) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
            raise AllocatorError(f"num_blocks must be an integer >= 0, not {num_blocks!r}")
        self.num_blocks = num_blocks
        # Lowest ids first: a stack popped from the end, so reversed order keeps allocations ascending
        # and contiguous on a fresh pool, which lets the copy executor merge runs of blocks.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._is_free = bytearray(b"\x01") * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take n blocks; raises AllocatorError when fewer than n are free (nothing is taken then)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise AllocatorError(f"cannot allocate {n!r} blocks; give an integer >= 0")
        if n > len(self._free):
            raise AllocatorError(f"asked for {n} blocks but only {len(self._free)} of {self.num_blocks} are free")
        if n == 0:
            return []
        ids = self._free[-n:]
        del self._free[-n:]
        ids.reverse()
        for i in ids:
            self._is_free[i] = 0
        return ids

    def try_allocate(self, n: int) -> list[int] | None:
        """Like allocate, but None instead of an error when the pool is short."""
        return self.allocate(n) if self.can_allocate(n) else None

    def free(self, ids: Iterable[int]) -> None:
        """Return blocks; the whole call fails (and frees nothing) on a foreign or already free id."""
        ids = list(ids)
        seen: set[int] = set()
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.num_blocks:
                raise AllocatorError(f"block id {i!r} is not in this pool of {self.num_blocks}")
            if self._is_free[i] or i in seen:
                raise AllocatorError(f"block {i} is freed twice")
            seen.add(i)
        for i in ids:
            self._is_free[i] = 1
        self._free.extend(reversed(ids))

    def is_whole(self) -> bool:
        """Every block is free again (what tests assert after all jobs end)."""
        return len(self._free) == self.num_blocks
