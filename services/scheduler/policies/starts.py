"""Bounded starts: when a job that has never run may join the started-but-unfinished set.

Design note: a preemptive policy that starts every arrival at once turns memory pressure into
thrashing (every started job holds KV, and the pool rotates them through the host). So a never-run
job starts only while the started set stays within what the batch slots and the KV pools carry:

- inside the batch slots (`max_jobs * num_stages` started jobs) a job starts when its prompt fits
  the device pool next to the KV the started jobs hold;
- past the slots a job starts only to preempt: when it outranks (by the policy's own priority) the
  lowest started job, and when the started set's KV, its prompt included, fits the device pool plus
  a share of the host pool (`scheduler.start_host_fraction`). The jobs it pushes out of the batch
  are exactly the ones the KV manager parks in host memory first.

Strict policies (`fcfs`, `orca`, `rtc`) never start past the slots and never let a younger job start
while an older never-run one is refused (head-of-line order, as vLLM's waiting queue). `orca` counts
each started job at its reservation (prompt + max_tokens) instead of its current length.
`scheduler.max_started` > 0 replaces the rule by a fixed bound on the started set, for experiments.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from common.config import SchedulerConfig
from services.scheduler.job import Job


@dataclass(frozen=True)
class Capacity:
    """The KV memory starts are planned against, as the KV manager reports it (blocks per stage)."""

    device_blocks: int  # blocks of the device pool
    host_blocks: int  # blocks of the host pool (0: no swapping)
    block_size: int  # tokens per block
    headroom_blocks: int = 0  # device blocks the KV manager keeps free for growth and arrivals

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)


# A started job's KV after its next iteration (current length; the job's reservation for orca).
Footprint = Callable[[Job], int]
# Priority key of a job: lower runs sooner.
RankKey = Callable[[Job], tuple]


def current_tokens(job: Job) -> int:
    return job.context_len + 1


def reserved_tokens(job: Job) -> int:
    return job.prompt_len + job.max_tokens


class OutputLengths:
    """Output lengths of the last `window` finished jobs: what attained service says of the rest.

    `expected_remaining(g)` is the mean of `L - g` over the recorded lengths `L > g`: under a heavy
    tail (decreasing hazard) it grows with `g`, so a job that has run long is worth parking for a new
    one; under light tails it shrinks, and preempting only adds sharing. A job longer than every
    recorded one has no estimate (0): nothing says parking it would pay.
    """

    def __init__(self, window: int = 512) -> None:
        self.window = window
        self.values: deque[int] = deque(maxlen=window)
        self._sorted: np.ndarray | None = None
        self._suffix = np.zeros(1)  # _suffix[i] = sum(_sorted[i:])

    def __len__(self) -> int:
        return len(self.values)

    def record(self, length: int) -> None:
        self.values.append(length)
        self._sorted = None

    def _prepare(self) -> np.ndarray:
        if self._sorted is None:
            self._sorted = np.sort(np.fromiter(self.values, dtype=np.int64, count=len(self.values)))
            self._suffix = np.append(np.cumsum(self._sorted[::-1])[::-1], 0).astype(np.float64)
        return self._sorted

    @property
    def mean(self) -> float:
        values = self._prepare()
        return float(self._suffix[0] / len(values)) if len(values) else 0.0

    def expected_remaining(self, generated: int) -> float:
        return float(self.expected_remaining_many(np.array([generated]))[0])

    def expected_remaining_many(self, generated: np.ndarray) -> np.ndarray:
        """expected_remaining of each entry of `generated` (tokens so far), in one pass."""
        values = self._prepare()
        i = np.searchsorted(values, generated, side="right")
        longer = len(values) - i
        # longer than every recorded job: nothing to go by, so no reason to park it (0)
        return np.where(longer > 0, self._suffix[i] / np.maximum(longer, 1) - generated, 0.0)


# Finished jobs needed before their lengths steer starts; until then MLFQ's own assumption (a job
# that ran long has long to go) decides.
MIN_LENGTHS = 32

# A started job is worth parking for a new one when its expected remaining output exceeds this many
# times a new job's expected output: the new job also costs a prefill, and a parked job pays a wait.
PARK_MARGIN = 1.5


class StartGate:
    """One batch fill's view of the started set; `admit(job)` says whether a never-run job starts."""

    def __init__(self, config: SchedulerConfig, slots: int, capacity: Capacity | None, started: Iterable[Job],
                 strict: bool, footprint: Footprint, rank: RankKey | None,
                 lengths: OutputLengths | None = None) -> None:
        self.strict = strict
        self.footprint = footprint
        # no later candidate can start: strict and an older never-run job was refused, or one was
        # refused for its rank (candidates come in rank order)
        self.closed = False
        jobs = list(started)
        self.count = len(jobs)
        self.fixed = config.max_started
        self.slots = slots
        self.rank = None if strict else rank
        self.lengths = lengths
        self.jobs = jobs
        self.past_slots = self.count >= slots  # parking is considered only if the started set fills them
        self._parkable: list[tuple] | None = None  # computed at the first candidate that needs it
        self._full: bool | None = None
        self.capacity = capacity
        self._used: int | None = None  # blocks the started jobs hold: summed when a start is first weighed
        if capacity is None:
            self.used = self.device_room = self.total_room = 0
            return
        self.device_room = capacity.device_blocks - capacity.headroom_blocks
        host = 0 if strict else int(config.start_host_fraction * capacity.host_blocks)
        self.total_room = self.device_room + host

    @property
    def used(self) -> int:
        if self._used is None:  # a decision that starts nothing (decode only) never walks the started set
            self._used = sum(self.capacity.blocks_for(self.footprint(j)) for j in self.jobs)
        return self._used

    @used.setter
    def used(self, blocks: int) -> None:
        self._used = blocks

    @property
    def parkable(self) -> list[tuple]:
        """Sorted ranks of the started jobs worth parking for a new one (parking pays only past the slots)."""
        if self._parkable is None:
            self._parkable = []
            if self.rank is not None and self.past_slots:
                jobs, lengths = self.jobs, self.lengths
                if lengths is not None and len(lengths) >= MIN_LENGTHS:
                    rest = lengths.expected_remaining_many(np.fromiter((j.num_generated for j in jobs), np.int64, len(jobs)))
                    bar = PARK_MARGIN * lengths.mean
                    jobs = [j for j, r in zip(jobs, rest) if r > bar]
                self._parkable = sorted(map(self.rank, jobs))
        return self._parkable

    def _is_full(self) -> bool:
        """No never-run job can start in this decision, whatever its rank or size."""
        if self.closed:
            return True
        if self.fixed > 0:
            return self.count >= self.fixed
        return self.count >= self.slots and (self.rank is None or self.count >= self.slots + len(self.parkable))

    def admit(self, job: Job) -> bool:
        """True if `job` (never run) may start now; the gate then counts it as started."""
        if self._full is None:
            self._full = self._is_full()
        if self._full:
            return False
        ok = self._allows(job)
        if ok:
            self.count += 1
            if self.capacity is not None:
                self.used += self.capacity.blocks_for(self.footprint(job))
        elif self.strict:
            self.closed = True
        self._full = self._is_full()
        return ok

    def _allows(self, job: Job) -> bool:
        if self.fixed > 0:
            return self.count < self.fixed
        need = self.capacity.blocks_for(self.footprint(job)) if self.capacity is not None else 0
        if self.count < self.slots:
            return self.capacity is None or self.count == 0 or self.used + need <= self.device_room
        if self.rank is None:
            return False
        # Past the slots, each start parks one started job that ranks below it and is worth parking:
        # the jobs that keep running stay within the slots.
        below = len(self.parkable) - bisect.bisect_right(self.parkable, self.rank(job))
        if self.count >= self.slots + below:
            # Policies walk their jobs in rank order, so every later candidate ranks no better: none
            # can start in this decision, and admit() answers them at once.
            self.closed = True
            return False
        return self.capacity is None or self.used + need <= self.total_room
