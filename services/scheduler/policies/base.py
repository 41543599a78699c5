"""The policy seam: a pure class that holds unfinished jobs and picks each iteration's batch."""

from __future__ import annotations

import abc
from typing import Callable, Iterable

from common.config import SchedulerConfig
from services.scheduler.job import Job

CanRun = Callable[[Job], bool]
PrefillTime = Callable[[int], float]  # prompt tokens -> seconds of a batch-1 first iteration

# Bound on jobs passed over (not runnable, or a prompt that does not fit the token budget) while
# filling one batch, so a decision stays well under a millisecond with 10,000 queued jobs.
MAX_SKIPPED = 512

# Weight of the newest iteration in the running mean used by run_order's time estimates.
ITERATION_EWMA = 0.2


class Policy(abc.ABC):
    """Holds the live jobs; `schedule` picks a batch, `update` accounts the service it got.

    Call order per iteration: `schedule(now, can_run)` -> run the batch -> `update(batch, s, now)`
    -> `remove(job)` for each job that finished (update ignores jobs already removed).
    """

    name = "base"

    def __init__(self, config: SchedulerConfig, prefill_time: PrefillTime | None = None) -> None:
        config.validate()
        self.config = config
        self.prefill_time = prefill_time
        self.iteration_s = 0.0  # running mean of measured iteration times, seconds

    @abc.abstractmethod
    def add(self, job: Job, now: float) -> None:
        """Take a newly arrived job."""

    @abc.abstractmethod
    def remove(self, job: Job) -> None:
        """Forget a job that finished, was cancelled or failed."""

    @abc.abstractmethod
    def schedule(self, now: float, can_run: CanRun) -> list[Job]:
        """The next batch, in priority order, within the batch limits; [] when nothing can run."""

    @abc.abstractmethod
    def run_order(self, now: float) -> list[Job]:
        """Every held job, soonest expected to be scheduled first."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of held jobs."""

    def update(self, batch: list[Job], iteration_s: float, now: float) -> None:
        """Account one iteration of `iteration_s` seconds that ended at `now` for every job in `batch`."""
        if iteration_s < 0:
            raise ValueError(f"iteration_s must be >= 0, got {iteration_s}")
        if self.iteration_s == 0.0:
            self.iteration_s = iteration_s
        else:
            self.iteration_s += ITERATION_EWMA * (iteration_s - self.iteration_s)
        for job in batch:
            job.service_s += iteration_s
            job.attained_s += iteration_s
            job.last_run_s = now

    def fill(self, candidates: Iterable[Job], can_run: CanRun) -> list[Job]:
        """Take candidates in order until max_jobs or the prefill token budget is reached.

        Prompt tokens (job.num_new_tokens of a job in prefill) count against max_prefill_tokens;
        decode jobs count only against max_jobs. A prefill that does not fit what is left of the
        budget is passed over. A prompt longer than the whole budget runs as the only prefill of
        its batch: it is taken when no other prefill has been, and uses up the budget; decode
        jobs still join. (Were it to run only when first in priority order, a long prompt behind
        running jobs would wait until every one of them finished.)
        """
        max_jobs, limit = self.config.max_jobs, self.config.max_prefill_tokens
        batch: list[Job] = []
        budget, skipped = limit, 0
        for job in candidates:
            if not can_run(job):
                skipped += 1
                if skipped > MAX_SKIPPED:
                    break
                continue
            # job.num_new_tokens and job.is_prefill, inlined: this loop is the scheduler's hot path
            new = job.prompt_len + job.num_generated - job.num_computed
            if new > 1 or job.num_generated == 0:
                if new > budget and budget < limit:
                    skipped += 1
                    if skipped > MAX_SKIPPED:
                        break
                    continue
                # a prompt longer than the whole budget takes all of it: no other prefill joins
                budget = max(budget - new, 0)
            batch.append(job)
            if len(batch) >= max_jobs:
                break
        return batch


def check_new(job: Job, held: dict[int, Job] | set[int]) -> None:
    """Refuse a finished job or a second add of the same job_id."""
    if job.is_finished:
        raise ValueError(f"job {job.job_id} is already {job.status.name}; only live jobs can be added")
    if job.job_id in held:
        raise ValueError(f"job {job.job_id} is already held by the policy")
