"""Clairvoyant shortest-remaining-output-first: a lower bound on average JCT, for comparison only."""

from __future__ import annotations

import heapq

from common.config import SchedulerConfig
from services.scheduler.job import Job
from services.scheduler.policies.base import CanRun, Policy, PrefillTime, check_new


class SRPTOracle(Policy):
    """Jobs with the fewest remaining output tokens run first (ties: earlier arrival).

    The remaining length uses `oracle_output_len`, the true output length that only the simulator
    knows; without it the policy falls back to `max_tokens`. Iteration-level and preemptive.
    A heap with lazy deletion keeps a decision O(batch * log n): an entry is stale when the job
    left or ran since it was pushed (its version moved on).
    """

    name = "srpt-oracle"

    def __init__(self, config: SchedulerConfig, prefill_time: PrefillTime | None = None) -> None:
        super().__init__(config, prefill_time)
        self.jobs: dict[int, Job] = {}
        self.version: dict[int, int] = {}
        self.heap: list[tuple[int, float, int, int, Job]] = []  # (remaining, arrival, job_id, version, job)

    def __len__(self) -> int:
        return len(self.jobs)

    def push(self, job: Job) -> None:
        version = self.version[job.job_id] = self.version.get(job.job_id, -1) + 1
        heapq.heappush(self.heap, (job.remaining_tokens, job.arrival_s, job.job_id, version, job))

    def add(self, job: Job, now: float) -> None:
        check_new(job, self.jobs)
        self.jobs[job.job_id] = job
        self.push(job)

    def remove(self, job: Job) -> None:
        if self.jobs.pop(job.job_id, None) is None:
            raise KeyError(f"job {job.job_id} is not held by the {self.name} policy")
        del self.version[job.job_id]
        self.forget(job)

    def rank_key(self, job: Job) -> tuple:
        return (job.remaining_tokens,)

    def live_entries(self):
        """Pop entries in priority order, dropping stale ones; the caller pushes back what it saw."""
        while self.heap:
            entry = heapq.heappop(self.heap)
            if self.version.get(entry[2]) == entry[3]:
                yield entry

    def schedule(self, now: float, can_run: CanRun) -> list[Job]:
        seen: list[tuple[int, float, int, int, Job]] = []

        def candidates():
            for entry in self.live_entries():
                seen.append(entry)
                yield entry[4]

        batch = self.fill(candidates(), can_run)
        for entry in seen:
            heapq.heappush(self.heap, entry)
        return batch

    def update(self, batch: list[Job], iteration_s: float, now: float) -> None:
        held = [job for job in batch if job.job_id in self.jobs]
        super().update(held, iteration_s, now)
        for job in held:
            self.push(job)
        if len(self.heap) > 4 * len(self.jobs) + 64:
            self.heap = [e for e in self.heap if self.version.get(e[2]) == e[3]]
            heapq.heapify(self.heap)

    def run_order(self, now: float) -> list[Job]:
        """Remaining output tokens, ascending (ties: arrival): exactly the scheduling order."""
        return sorted(self.jobs.values(), key=lambda j: (j.remaining_tokens, j.arrival_s, j.job_id))
