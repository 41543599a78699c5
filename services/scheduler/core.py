"""The scheduler's pure core: the job pool, batches in flight, token accounting and finishing rules.

No sockets and no clock: every method takes `now` (seconds) and returns the messages to send. The
service around it only moves messages; tests drive it with a fake pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.messages import (
    BatchPlanned,
    BatchResult,
    BatchSampling,
    JobEvent,
    KVCapacity,
    KVChanged,
    ScheduleBatch,
    SubmitJob,
)
from services.scheduler.job import Job, JobStatus
from services.scheduler.policies.base import Policy
from services.scheduler.policies.starts import Capacity


@dataclass
class Entry:
    """What the scheduler keeps for one job besides the policy's view of it."""

    job: Job
    tokens: list[int]  # prompt, then every sampled token
    sampling: SubmitJob
    stop_ids: frozenset[int]
    sent: int = 0  # output tokens already sent to ingress


@dataclass
class InFlight:
    """A batch sent to the pipeline whose result has not come back."""

    batch_id: int
    job_ids: list[int]
    new_tokens: dict[int, int]  # job_id -> tokens the batch computes for it
    sent_s: float  # scheduler clock when sent


@dataclass
class Counters:
    submitted: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    iterations: int = 0
    tokens: int = 0
    preemptions: int = 0
    held_back: int = 0
    recomputes: int = 0
    rejected: int = 0  # SubmitJob for a job id that is already live (dropped)
    compute_s: float = 0.0


class SchedulerCore:
    """Job pool and iteration bookkeeping around a policy; at most `num_stages` batches in flight."""

    def __init__(self, policy: Policy, num_stages: int, eos_token_ids: tuple[int, ...] = (),
                 send_run_order: bool = True) -> None:
        self.policy = policy
        policy.set_limits(num_stages, None)  # the KV capacity comes with the KV manager's report
        self.send_run_order = send_run_order  # only swapping needs it; it is O(jobs) per batch
        self.num_stages = num_stages
        self.eos_token_ids = frozenset(eos_token_ids)
        self.entries: dict[int, Entry] = {}
        self.in_flight: dict[int, InFlight] = {}
        self.busy: set[int] = set()  # job ids inside an in-flight batch
        self.blocked: set[int] = set()  # held back by the KV manager until memory changes
        self.to_free: list[int] = []  # ended jobs whose KV the next ScheduleBatch frees
        self.ended_in_flight: set[int] = set()  # ended while in a batch: free when the batch returns
        self.running: set[int] = set()  # jobs that ran in a recent batch (for counting preemptions)
        self.copies_in_flight = 0  # KV copies not yet acknowledged, as the KV manager last said
        self.next_batch_id = 0
        self.counters = Counters()

    # --- jobs in -------------------------------------------------------------------------------

    def submit(self, msg: SubmitJob, now: float) -> list[JobEvent]:
        if msg.job_id in self.entries:
            # Ingress assigns job ids, so a second live one is forged or stale: answering with an error
            # under that id would end the innocent live job. It is dropped (the service logs it).
            self.counters.rejected += 1
            return []
        job = Job(msg.job_id, now, len(msg.prompt_ids), msg.max_tokens)
        stop = set(msg.stop_token_ids) | (set() if msg.ignore_eos else set(self.eos_token_ids))
        self.entries[msg.job_id] = Entry(job, list(msg.prompt_ids), msg, frozenset(stop))
        self.policy.add(job, now)
        self.counters.submitted += 1
        return []

    def cancel(self, job_id: int, now: float) -> list[JobEvent]:
        entry = self.entries.get(job_id)
        if entry is None:
            return []  # already ended: its final event went out then
        self._end(entry, JobStatus.CANCELLED, now)
        self.counters.cancelled += 1
        return [JobEvent(job_id, [], "cancelled", "", "")]

    def fail_all(self, code: str, message: str, now: float) -> list[JobEvent]:
        """End every live job with an error (a stage died): batches in flight will never come back."""
        self.in_flight.clear()
        self.busy.clear()
        self.ended_in_flight.clear()
        events = []
        for entry in list(self.entries.values()):
            self._end(entry, JobStatus.FAILED, now)
            self.counters.failed += 1
            events.append(JobEvent(entry.job.job_id, [], "error", code, message))
        return events

    # --- batches out ---------------------------------------------------------------------------

    def can_send(self) -> bool:
        return len(self.in_flight) < self.num_stages

    def next_batch(self, now: float) -> ScheduleBatch | None:
        """The next batch to send, a housekeeping message when only frees are pending, or None."""
        if not self.can_send():
            return None
        picked = self.policy.schedule(now, self._can_run) if self.entries else []
        if not picked and self.blocked and not self.in_flight and not self.copies_in_flight:
            # Nothing runs and no memory event is coming: jobs held back for room try again now
            # (a decision passes over a bounded number of held jobs, so many could hide the rest).
            self.blocked.clear()
            picked = self.policy.schedule(now, self._can_run)
        if not picked and not self.to_free:
            return None
        batch_id = self.next_batch_id
        self.next_batch_id += 1
        in_flight = sorted(self.busy)  # before this batch's jobs join it
        job_ids, new, context, inputs = [], [], [], []
        sampling = BatchSampling([], [], [], [], [])
        for job in picked:
            entry = self.entries[job.job_id]
            n = job.num_new_tokens
            job_ids.append(job.job_id)
            new.append(n)
            context.append(job.num_computed)
            inputs.extend(entry.tokens[job.num_computed : job.num_computed + n])
            params = entry.sampling
            for column, value in zip(sampling.columns(), (params.temperature, params.top_k, params.top_p,
                                                          params.seed, job.num_generated, params.logprobs)):
                column.append(value)
            self.busy.add(job.job_id)
            job.status = JobStatus.RUNNING
        self._count_preemptions(set(job_ids))
        msg = ScheduleBatch(
            batch_id=batch_id,
            job_ids=job_ids,
            num_new_tokens=new,
            context_lens=context,
            sampling=sampling,
            input_ids=np.asarray(inputs, dtype=np.int64),
            freed_job_ids=self.to_free,
            run_order=[j.job_id for j in self.policy.run_order(now)] if picked and self.send_run_order else [],
            in_flight_job_ids=in_flight,
        )
        self.to_free = []
        # A housekeeping message also flows through the pipeline, so it is in flight too.
        self.in_flight[batch_id] = InFlight(batch_id, job_ids, dict(zip(job_ids, new)), now)
        return msg

    def _can_run(self, job: Job) -> bool:
        return job.job_id not in self.busy and job.job_id not in self.blocked

    def _count_preemptions(self, chosen: set[int]) -> None:
        """A job that ran and is in no batch now was preempted at this iteration boundary."""
        for job_id in list(self.running):
            if job_id in chosen or job_id in self.busy:
                continue
            self.running.discard(job_id)
            entry = self.entries.get(job_id)
            if entry is not None:
                entry.job.status = JobStatus.PREEMPTED
                entry.job.preemptions += 1
                self.counters.preemptions += 1
        self.running |= chosen

    # --- results back --------------------------------------------------------------------------

    def on_planned(self, msg: BatchPlanned) -> None:
        """The KV manager left some picked jobs out: they are free to be picked again once memory changes."""
        flight = self.in_flight.get(msg.batch_id)
        if flight is None:
            return  # a batch lost to a stage restart: its jobs are runnable again already
        for job_id in msg.held_job_ids:
            if job_id in flight.new_tokens:
                flight.job_ids.remove(job_id)
                del flight.new_tokens[job_id]
                self.busy.discard(job_id)
                self._release_if_ended(job_id)
                if job_id in self.entries:
                    self.blocked.add(job_id)
                    self.counters.held_back += 1
        self._recompute(msg.dropped_job_ids)
        self.copies_in_flight = msg.copies_in_flight

    def set_capacity(self, msg: KVCapacity) -> None:
        """The KV manager's pools (sent when it starts, and again after a restart): starts follow them."""
        capacity = Capacity(msg.device_blocks, msg.host_blocks, msg.block_size, msg.headroom_blocks)
        self.policy.set_limits(self.num_stages, capacity)

    def on_kv_changed(self, msg: KVChanged) -> None:
        """A copy was acknowledged or KV was lost: jobs held back may fit or be resident now."""
        self.copies_in_flight = msg.copies_in_flight
        self._recompute(msg.dropped_job_ids)
        self.blocked.clear()

    def _recompute(self, job_ids: list[int]) -> None:
        for job_id in job_ids:
            entry = self.entries.get(job_id)
            if entry is not None:
                entry.job.num_computed = 0  # its KV is gone: the next run recomputes prompt + output
                self.counters.recomputes += 1

    def restart_pipeline(self) -> None:
        """A stage restarted: batches in flight are lost and their jobs become runnable again.

        Their results will never come; the KV manager reports which jobs lost their KV (KVChanged).
        """
        for flight in self.in_flight.values():
            for job_id in flight.job_ids:
                self.busy.discard(job_id)
                self._release_if_ended(job_id)
        self.in_flight.clear()
        self.busy.clear()
        self.blocked.clear()

    def on_result(self, msg: BatchResult, now: float) -> list[JobEvent]:
        flight = self.in_flight.pop(msg.batch_id, None)
        if flight is None:
            return []
        for job_id in flight.job_ids:
            self.busy.discard(job_id)
        if msg.error:  # a stage failed on this batch: its jobs end with `internal`, the rest go on
            events = []
            for job_id in flight.job_ids:
                entry = self.entries.get(job_id)
                if entry is not None:
                    self._end(entry, JobStatus.FAILED, now)
                    self.counters.failed += 1
                    events.append(JobEvent(job_id, [], "error", "internal", msg.error))
            return events
        self.counters.iterations += 1
        self.counters.compute_s += msg.compute_s
        events = self._fail_sampling(msg, flight, now)
        ran = [self.entries[j].job for j in msg.job_ids if j in self.entries]
        iteration_s = msg.compute_s if msg.compute_s > 0 else now - flight.sent_s
        if ran:
            self.policy.update(ran, iteration_s, now)
        for row, (job_id, token) in enumerate(zip(msg.job_ids, msg.token_ids)):
            entry = self.entries.get(job_id)
            if entry is None:
                continue  # cancelled while in flight, or its sampling failed
            event = self._advance(entry, flight.new_tokens.get(job_id, 0), token, now)
            events.append(event.with_logprobs(msg.logprobs_of(row)))
        self._release_ended(flight)
        # A finished job frees memory: held jobs may fit now. An iteration that ran nothing while no
        # other batch or copy is pending cannot be followed by any memory event, so retry then too.
        stalled = not msg.job_ids and not self.in_flight and not self.copies_in_flight
        if stalled or any(e.finish_reason for e in events):
            self.blocked.clear()
        return events

    def _fail_sampling(self, msg: BatchResult, flight: InFlight, now: float) -> list[JobEvent]:
        """Jobs whose sampling failed on the last stage end with `internal`; their batch-mates go on."""
        events = []
        for job_id in msg.failed_job_ids:
            entry = self.entries.get(job_id)
            if entry is not None and job_id in flight.new_tokens:
                self._end(entry, JobStatus.FAILED, now)
                self.counters.failed += 1
                events.append(JobEvent(job_id, [], "error", "internal", msg.failure or "sampling failed"))
        return events

    def _advance(self, entry: Entry, computed: int, token: int, now: float) -> JobEvent:
        job = entry.job
        job.num_computed += computed
        job.num_generated += 1
        entry.tokens.append(token)
        self.counters.tokens += 1
        if job.first_token_s is None:
            job.first_token_s = now
        reason = ""
        if token in entry.stop_ids:
            reason = "stop"
        elif job.num_generated >= job.max_tokens:
            reason = "length"
        new = entry.tokens[len(entry.tokens) - (job.num_generated - entry.sent) :]
        entry.sent = job.num_generated
        if reason:
            self._end(entry, JobStatus.FINISHED, now)
            self.counters.finished += 1
        return JobEvent(job.job_id, new, reason, "", "")

    def _end(self, entry: Entry, status: JobStatus, now: float) -> None:
        job = entry.job
        job.status = status
        job.finish_s = now
        self.policy.remove(job)
        del self.entries[job.job_id]
        self.blocked.discard(job.job_id)
        self.running.discard(job.job_id)
        if job.job_id in self.busy:
            self.ended_in_flight.add(job.job_id)
        else:
            self.to_free.append(job.job_id)

    def _release_if_ended(self, job_id: int) -> None:
        if job_id in self.ended_in_flight:
            self.ended_in_flight.discard(job_id)
            self.to_free.append(job_id)

    def _release_ended(self, flight: InFlight) -> None:
        for job_id in flight.job_ids:
            self._release_if_ended(job_id)

    # --- views ---------------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        return not self.entries and not self.in_flight and not self.to_free

    def stats(self) -> dict[str, int | float]:
        c = self.counters
        return {
            "jobs_live": len(self.entries),
            "batches_in_flight": len(self.in_flight),
            "jobs_submitted": c.submitted,
            "jobs_finished": c.finished,
            "jobs_cancelled": c.cancelled,
            "jobs_failed": c.failed,
            "iterations": c.iterations,
            "tokens_generated": c.tokens,
            "preemptions": c.preemptions,
            "held_back": c.held_back,
            "recomputes": c.recomputes,
            "submits_rejected": c.rejected,
            "compute_s": c.compute_s,
        }
