"""Arrival-order baselines: iteration-level FCFS on paged KV, Orca with reserved KV, run to completion."""

from __future__ import annotations

from collections import OrderedDict

from common.config import SchedulerConfig
from services.scheduler.job import Job
from services.scheduler.policies.base import CanRun, Policy, PrefillTime, check_new
from services.scheduler.policies.starts import reserved_tokens


class FCFS(Policy):
    """Each iteration takes the oldest runnable jobs. A running job is older than any job that
    arrived after it, so a newer job never displaces it; it leaves the batch only by finishing
    or when the KV manager cannot keep it resident (`can_run` False).

    Strict under memory pressure (the vLLM way): jobs start in arrival order, within the batch
    slots, while their prompt fits the device pool beside the started jobs' KV; a younger job never
    starts while an older one waits for room.
    """

    name = "fcfs"
    strict_starts = True

    def __init__(self, config: SchedulerConfig, prefill_time: PrefillTime | None = None) -> None:
        super().__init__(config, prefill_time)
        self.queue: OrderedDict[int, Job] = OrderedDict()  # arrival order

    def __len__(self) -> int:
        return len(self.queue)

    def add(self, job: Job, now: float) -> None:
        check_new(job, self.queue)
        self.queue[job.job_id] = job

    def remove(self, job: Job) -> None:
        if self.queue.pop(job.job_id, None) is None:
            raise KeyError(f"job {job.job_id} is not held by the {self.name} policy")
        self.forget(job)

    def schedule(self, now: float, can_run: CanRun) -> list[Job]:
        return self.fill(self.queue.values(), can_run)

    def run_order(self, now: float) -> list[Job]:
        """Arrival order: exactly the order in which schedule considers jobs."""
        return list(self.queue.values())


class Orca(FCFS):
    """The FastServe paper's baseline, Orca: iteration-level FCFS that reserves each job's KV for
    prompt + max_tokens when it starts. Jobs start in arrival order while the reservations fit the
    device pool (and the batch slots); a started job runs every iteration until it finishes, so it
    is never preempted, and its KV never has to move.
    """

    name = "orca"
    footprint = staticmethod(reserved_tokens)


class RunToCompletion(FCFS):
    """Request-level batching (FasterTransformer-style): a batch formed from the oldest jobs runs
    until every job in it has finished; no job joins it meanwhile.

    A new batch forms only when no job of the open batches can run and fewer than S (pipeline
    stages) are open: on one stage when the open batch has drained; with S stages up to S
    request-level batches alternate in the pipeline. Like FasterTransformer it reserves each job's
    KV for prompt + max_tokens, so a batch is as large as the reservations let it be.
    """

    name = "rtc"
    footprint = staticmethod(reserved_tokens)  # request-level engines allocate KV for the maximum length

    def __init__(self, config: SchedulerConfig, prefill_time: PrefillTime | None = None) -> None:
        super().__init__(config, prefill_time)
        self.open: list[list[Job]] = []  # batches formed and not yet drained, oldest first
        self.batch_of: dict[int, int] = {}  # job_id -> index into self.open

    def remove(self, job: Job) -> None:
        super().remove(job)
        if job.job_id in self.batch_of:
            del self.batch_of[job.job_id]
            for batch in self.open:
                if job in batch:
                    batch.remove(job)
            self.open = [b for b in self.open if b]
            self.batch_of = {j.job_id: i for i, b in enumerate(self.open) for j in b}

    def schedule(self, now: float, can_run: CanRun) -> list[Job]:
        for batch in self.open:
            runnable = [job for job in batch if can_run(job)]
            if runnable:
                return runnable
        if len(self.open) >= self.num_stages:
            return []  # one request-level batch per stage: the next forms when one drains
        waiting = (job for job in self.queue.values() if job.job_id not in self.batch_of)
        batch = self.fill(waiting, can_run)
        if batch:
            self.open.append(batch)
            for job in batch:
                self.batch_of[job.job_id] = len(self.open) - 1
        return list(batch)

    def run_order(self, now: float) -> list[Job]:
        """Open batches (oldest first), then the waiting jobs in arrival order."""
        members = [job for batch in self.open for job in batch]
        return members + [job for job in self.queue.values() if job.job_id not in self.batch_of]
