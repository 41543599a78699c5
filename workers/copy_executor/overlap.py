"""Copy statistics and the measure of how much copy time ran while compute ran."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

COPY, COMPUTE = 0, 1


@dataclass(frozen=True)
class CopyStats:
    ops_out: int = 0  # device -> host ops completed
    ops_in: int = 0  # host -> device ops completed
    bytes_out: int = 0
    bytes_in: int = 0
    copy_s: float = 0.0  # seconds copies were running
    compute_s: float = 0.0  # seconds compute was running (between compute_begin and compute_end)
    overlap_s: float = 0.0  # seconds both were running

    @property
    def hidden_fraction(self) -> float:
        """Share of copy time that overlapped compute (1.0 when nothing was copied)."""
        return self.overlap_s / self.copy_s if self.copy_s > 0 else 1.0


class OverlapMeter:
    """Intersection of two activities, each a sequence of non-overlapping intervals in time order.

    Intervals arrive as they close; an interval is kept only while the other side could still meet it
    (it has an interval open or waiting), so memory stays bounded however long the process runs.
    """

    def __init__(self) -> None:
        self._closed: tuple[deque[tuple[float, float]], deque[tuple[float, float]]] = (deque(), deque())
        self._open = [False, False]
        self.busy_s = [0.0, 0.0]
        self.overlap_s = 0.0

    def begin(self, side: int) -> None:
        """An interval of `side` has started (or is queued) and has not been added yet."""
        self._open[side] = True

    def add(self, side: int, start: float, end: float, still_open: bool = False) -> None:
        """A closed interval of `side`; still_open says another one of that side is already under way."""
        if end < start:
            raise ValueError(f"interval ends before it starts: {start} > {end}")
        other = 1 - side
        self._open[side] = still_open
        self.busy_s[side] += end - start
        if self._open[other] or self._closed[other]:
            self._closed[side].append((start, end))
            self._merge()
        # Whatever the other side does next starts after now, so our closed intervals cannot meet it.
        for s in (side, other):
            if not self._open[1 - s] and not self._closed[1 - s]:
                self._closed[s].clear()

    def _merge(self) -> None:
        a, b = self._closed
        while a and b:
            (a0, a1), (b0, b1) = a[0], b[0]
            self.overlap_s += max(0.0, min(a1, b1) - max(a0, b0))
            # The interval that ends first cannot meet anything later on the other side.
            (a if a1 <= b1 else b).popleft()
