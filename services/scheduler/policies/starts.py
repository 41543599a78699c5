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
import itertools
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable

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
        self._sorted: list[int] | None = None
        self._suffix: list[int] = []  # _suffix[i] = sum(_sorted[i:])

    def __len__(self) -> int:
        return len(self.values)

    def record(self, length: int) -> None:
        self.values.append(length)
        self._sorted = None

    def _prepare(self) -> list[int]:
        if self._sorted is None:
            self._sorted = sorted(self.values)
            self._suffix = list(itertools.accumulate(reversed(self._sorted)))[::-1] + [0]
        return self._sorted

    @property
    def mean(self) -> float:
        values = self._prepare()
        return self._suffix[0] / len(values) if values else 0.0

    def expected_remaining(self, generated: int) -> float:
        values = self._prepare()
        i = bisect.bisect_right(values, generated)
        longer = len(values) - i
        if longer == 0:
            return 0.0  # longer than every recorded job: nothing to go by, so no reason to park it
        return self._suffix[i] / longer - generated


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
        self.parkable: list[tuple] = []  # sorted ranks of started jobs worth parking for a new one
        if self.rank is not None and self.count >= slots:
            learned = lengths is not None and len(lengths) >= MIN_LENGTHS
            bar = PARK_MARGIN * lengths.mean if learned else 0.0
            self.parkable = sorted(
                self.rank(j) for j in jobs if not learned or lengths.expected_remaining(j.num_generated) > bar
            )
        self._update_full()
        self.capacity = capacity
        if capacity is None:
            self.used = self.device_room = self.total_room = 0
            return
        self.used = sum(capacity.blocks_for(footprint(j)) for j in jobs)
        self.device_room = capacity.device_blocks - capacity.headroom_blocks
        host = 0 if strict else int(config.start_host_fraction * capacity.host_blocks)
        self.total_room = self.device_room + host

    def _update_full(self) -> None:
        """`full`: no never-run job can start in this decision, whatever its rank or size."""
        if self.closed:
            self.full = True
        elif self.fixed > 0:
            self.full = self.count >= self.fixed
        else:
            self.full = self.count >= self.slots and (self.rank is None or self.count >= self.slots + len(self.parkable))

    def admit(self, job: Job) -> bool:
        """True if `job` (never run) may start now; the gate then counts it as started."""
        if self.full:
            return False
        ok = self._allows(job)
        if ok:
            self.count += 1
            if self.capacity is not None:
                self.used += self.capacity.blocks_for(self.footprint(job))
        elif self.strict:
            self.closed = True
        self._update_full()
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
