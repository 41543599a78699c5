"""The policy seam: a pure class that holds unfinished jobs and picks each iteration's batch."""

from __future__ import annotations

import abc
from typing import Callable, Iterable

from common.config import SchedulerConfig
from services.scheduler.job import Job, JobStatus
from services.scheduler.policies.starts import Capacity, OutputLengths, RankKey, StartGate, current_tokens

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
    strict_starts = False  # head-of-line starts within the batch slots only (see starts.py)
    footprint = staticmethod(current_tokens)  # KV a started job counts for, in tokens

    def __init__(self, config: SchedulerConfig, prefill_time: PrefillTime | None = None) -> None:
        config.validate()
        self.config = config
        self.prefill_time = prefill_time
        self.iteration_s = 0.0  # running mean of measured iteration times, seconds
        self.num_stages = 1  # pipeline stages: batches in flight at once
        self.slots = config.max_jobs  # started jobs the batches in flight can hold: max_jobs * stages
        self.capacity: Capacity | None = None  # KV pools as the KV manager reports them; None = unknown
        self.started: dict[int, Job] = {}  # live jobs picked at least once
        self.new_tokens: dict[int, int] = {}  # job_id -> tokens its last picked iteration computes
        self.lengths: OutputLengths | None = None  # finished output lengths, for policies that learn them
        self._costs: dict[int, float] = {}  # tokens -> prefill_time(tokens)

    def _alone_cost(self, tokens: int) -> float:
        """prefill_time(tokens), memoized: a cost model's answer is a pure function of the length."""
        cost = self._costs.get(tokens)
        if cost is None:
            cost = self._costs[tokens] = self.prefill_time(tokens) if self.prefill_time else float(tokens)
        return cost

    def set_limits(self, num_stages: int, capacity: Capacity | None) -> None:
        """The pipeline depth and the KV capacity that bound starts (starts.py)."""
        if num_stages <= 0:
            raise ValueError(f"num_stages must be > 0, got {num_stages}")
        self.num_stages = num_stages
        self.slots = self.config.max_jobs * num_stages
        self.capacity = capacity

    # The job's priority as a sortable key, lower runs sooner; None: a new job never outranks a
    # started one, so starts stay within the batch slots.
    rank_key: RankKey | None = None

    def forget(self, job: Job) -> None:
        """Drop the base class's state of a job that left (every `remove` calls it)."""
        self.started.pop(job.job_id, None)
        self.new_tokens.pop(job.job_id, None)
        if self.lengths is not None and job.status is JobStatus.FINISHED:
            self.lengths.record(job.num_generated)

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
        for job, charge in zip(batch, self.charges(batch, iteration_s)):
            job.service_s += charge
            job.attained_s += charge
            job.last_run_s = now

    def charges(self, batch: list[Job], iteration_s: float) -> list[float]:
        """Service each job of the batch attained in one iteration of `iteration_s` seconds.

        `service_share = "own"`: the iteration split in proportion to what each job's tokens cost
        alone (the batch-1 time `prefill_time(new tokens)`, the unit skip-join joins queues by; the
        token count without a profile), so the shares add up to the iteration. `"iteration"`: every
        job is charged the whole iteration (it waited for the whole forward pass).
        """
        if self.config.service_share == "iteration" or len(batch) <= 1:
            return [iteration_s] * len(batch)
        weights = [self._alone_cost(self.new_tokens.get(job.job_id, 1)) for job in batch]
        total = sum(weights)
        if total <= 0:
            return [iteration_s / len(batch)] * len(batch)
        return [iteration_s * w / total for w in weights]

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
        started = self.started
        gate = StartGate(self.config, self.slots, self.capacity, started.values(), self.strict_starts,
                         self.footprint, self.rank_key, self.lengths)
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
                if new > budget and budget < limit or job.job_id not in started and not gate.admit(job):
                    skipped += 1
                    if skipped > MAX_SKIPPED:
                        break
                    continue
                # a prompt longer than the whole budget takes all of it: no other prefill joins
                budget = max(budget - new, 0)
            batch.append(job)
            self.new_tokens[job.job_id] = new
            if len(batch) >= max_jobs:
                break
        if skipped > MAX_SKIPPED and len(batch) < max_jobs:
            self._fill_started(batch, budget, can_run)
        for job in batch:
            started[job.job_id] = job
        return batch

    def _fill_started(self, batch: list[Job], budget: int, can_run: CanRun) -> None:
        """The walk gave up on jobs passed over (a queue of never-run jobs the start gate refuses can
        hide the started ones below it): fill the rest from the started jobs, by rank (ties in the
        order they first started)."""
        chosen = {job.job_id for job in batch}
        rest = [job for job in self.started.values() if job.job_id not in chosen]
        if self.rank_key is not None:
            rest.sort(key=self.rank_key)
        for job in rest:
            if not can_run(job):
                continue
            new = job.num_new_tokens
            if job.is_prefill:
                if new > budget and budget < self.config.max_prefill_tokens:
                    continue
                budget = max(budget - new, 0)
            batch.append(job)
            self.new_tokens[job.job_id] = new
            if len(batch) >= self.config.max_jobs:
                return


def check_new(job: Job, held: dict[int, Job] | set[int]) -> None:
    """Refuse a finished job or a second add of the same job_id."""
    if job.is_finished:
        raise ValueError(f"job {job.job_id} is already {job.status.name}; only live jobs can be added")
    if job.job_id in held:
        raise ValueError(f"job {job.job_id} is already held by the policy")
