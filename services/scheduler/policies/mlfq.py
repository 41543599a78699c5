"""Multi-level feedback queue: classic (join the top) and skip-join (join by profiled prefill time)."""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from typing import Iterator

from common.config import SchedulerConfig
from services.scheduler.job import Job
from services.scheduler.policies.base import CanRun, Policy, PrefillTime, check_new
from services.scheduler.policies.starts import OutputLengths

# Promotions per starvation check, in units of max_jobs: a burst of starved jobs cannot all run
# in the next iteration anyway, and promoting 10,000 at once would stall one decision for ~5 ms.
# The rest are promoted, longest wait first, at the following iterations.
MAX_PROMOTIONS_PER_CHECK = 4

# Clock comparisons allow for float rounding (12.9 + 0.1 != 13.0 in binary floating point).
TIME_EPS_S = 1e-9


class MLFQ(Policy):
    """Every new job joins queue 0; a job whose attained service in its queue exceeds that queue's
    quantum `base_quantum_s * quantum_ratio**level` drops one level; a job that waited
    `starvation_limit_s` (from its arrival if it never ran, else from its last run) returns to queue 0.

    Queues are insertion-ordered dicts, so removal and front/back insertion are O(1), and a batch
    is filled by walking them in priority order, stopping at the batch limits.
    """

    name = "mlfq"

    def __init__(self, config: SchedulerConfig, prefill_time: PrefillTime | None = None) -> None:
        super().__init__(config, prefill_time)
        # Attained service is MLFQ's only guess at a job's size; the finished lengths say when
        # that guess is worth preempting for (starts.py).
        self.lengths = OutputLengths()
        self.quanta = [config.base_quantum_s * config.quantum_ratio**i for i in range(config.num_levels)]
        self.levels: list[OrderedDict[int, Job]] = [OrderedDict() for _ in self.quanta]
        # job_id -> (start of the current wait, job), ordered by that start: the starvation check
        # pops from the front and stops at the first job that has not waited long enough.
        self.waits: OrderedDict[int, tuple[float, Job]] = OrderedDict()
        self.last_check_s = float("-inf")
        self.promotion_backlog = False  # starved jobs left for the next call by the per-check cap
        self.promotions = 0
        self.demotions = 0
        self.first_demotions = 0  # demotions right after a job's first iteration

    def __len__(self) -> int:
        return len(self.waits)

    def join_level(self, prompt_len: int) -> int:
        """The queue a new job joins: 0 for classic MLFQ."""
        return 0

    def add(self, job: Job, now: float) -> None:
        check_new(job, self.waits)
        job.level = self.join_level(job.prompt_len)
        job.attained_s = 0.0
        self.levels[job.level][job.job_id] = job
        self.waits[job.job_id] = (job.arrival_s if job.last_run_s is None else job.last_run_s, job)

    def remove(self, job: Job) -> None:
        if job.job_id not in self.waits:
            raise KeyError(f"job {job.job_id} is not held by the {self.name} policy")
        del self.waits[job.job_id]
        del self.levels[job.level][job.job_id]
        self.forget(job)

    def rank_key(self, job: Job) -> tuple:
        return (job.level,)

    def schedule(self, now: float, can_run: CanRun) -> list[Job]:
        if self.promotion_backlog or now - self.last_check_s >= self.config.starvation_check_s - TIME_EPS_S:
            self.last_check_s = now
            self.promotion_backlog = self.promote_starved(now)
        return self.fill(itertools.chain.from_iterable(q.values() for q in self.levels), can_run)

    def promote_starved(self, now: float) -> bool:
        """Move jobs that waited at least the starvation limit to the back of queue 0, longest
        wait first, at most MAX_PROMOTIONS_PER_CHECK times max_jobs of them; True if more remain."""
        limit = self.config.starvation_limit_s
        budget = MAX_PROMOTIONS_PER_CHECK * self.config.max_jobs
        while self.waits:
            job_id, (since, job) = next(iter(self.waits.items()))
            if now - since < limit - TIME_EPS_S:
                return False
            if budget == 0:
                return True
            budget -= 1
            if job.level > 0:
                del self.levels[job.level][job_id]
                job.level, job.attained_s = 0, 0.0
                self.levels[0][job_id] = job
                self.promotions += 1
            # the wait restarts at the promotion, so a job is not promoted again at every check
            self.waits[job_id] = (now, job)
            self.waits.move_to_end(job_id)
        return False

    def update(self, batch: list[Job], iteration_s: float, now: float) -> None:
        held = [job for job in batch if job.job_id in self.waits]
        first = {job.job_id for job in held if job.last_run_s is None}
        super().update(held, iteration_s, now)
        last = len(self.quanta) - 1
        for job in held:
            self.waits[job.job_id] = (now, job)
            self.waits.move_to_end(job.job_id)
            if job.attained_s > self.quanta[job.level] and job.level < last:
                self.demote(job)
                self.first_demotions += job.job_id in first

    def demote(self, job: Job) -> None:
        del self.levels[job.level][job.job_id]
        job.level += 1
        job.attained_s = 0.0
        queue = self.levels[job.level]
        queue[job.job_id] = job
        if self.config.demote_to == "front":
            queue.move_to_end(job.job_id, last=False)
        self.demotions += 1

    def run_order(self, now: float) -> list[Job]:
        """Jobs by estimated next-run time, soonest first; ties keep queue order.

        A job at rank k of the queue walk (level, then position) is estimated to run after
        k // max_jobs iterations of the running mean iteration time; a job in a lower queue may
        instead be promoted at the end of its wait (start + starvation_limit_s), and then counts
        as running at that time. Both sequences are already sorted, so this is a merge, O(n).
        """
        per_batch, step = self.config.max_jobs, self.iteration_s
        by_rank = ((now + (k // per_batch) * step, 0, k, job) for k, job in enumerate(self))
        limit = self.config.starvation_limit_s
        by_wait = (
            (max(now, since + limit), 1, k, job)
            for k, (since, job) in enumerate(self.waits.values())
            if job.level > 0
        )
        order, seen = [], set()
        for _, _, _, job in heapq.merge(by_rank, by_wait):
            if job.job_id not in seen:
                seen.add(job.job_id)
                order.append(job)
        return order

    def queue_sizes(self) -> list[int]:
        return [len(q) for q in self.levels]

    def __iter__(self) -> Iterator[Job]:
        return itertools.chain.from_iterable(q.values() for q in self.levels)


class SkipJoinMLFQ(MLFQ):
    """FastServe's MLFQ: a new job joins the highest queue whose quantum covers its first iteration.

    The first-iteration time comes from `prefill_time(prompt_len)` (the profile from
    `fastserve profile`). Without one, every job joins queue 0, as in classic MLFQ.
    """

    name = "skip-join-mlfq"

    def join_level(self, prompt_len: int) -> int:
        if self.prefill_time is None:
            return 0
        first_iteration_s = self.prefill_time(prompt_len)
        for level, quantum in enumerate(self.quanta):
            if quantum >= first_iteration_s:
                return level
        return len(self.quanta) - 1
