"""The scheduler's pure core: the job pool, batches in flight, token accounting and finishing rules.

The iteration contract (as vLLM V1's schedule() / update_from_output()): `schedule(now)` returns a
plain `Step` (the jobs of one iteration, their new tokens, context lengths, sampling, and the KV to
free), `planned(...)` takes what the KV side held back or dropped, and `update(StepOutput, now)`
takes the sampled tokens and returns the job events. No sockets and no clock: the scheduler service
translates to and from wire messages, the simulator (`bench/sim/engine.py`) feeds modelled outputs,
and tests drive it with a fake pipeline. All three run this one loop.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from common.messages import BatchSampling, JobEvent, KVCapacity, SubmitJob, TokenLogprobs
from services.scheduler.job import Job, JobStatus
from services.scheduler.policies.base import Policy
from services.scheduler.policies.starts import Capacity


def overlaps(scheduler: object, num_stages: int) -> bool:
    """Whether the core carries decode jobs into the next batch (`scheduler.overlap`): "on" and "auto"
    (the default) do, with any number of stages (docs/SCHEDULING.md); "off" does not."""
    return getattr(scheduler, "overlap", "off") in ("on", "auto")


@dataclass
class Step:
    """One iteration as the core decided it (an empty `job_ids` with frees is housekeeping)."""

    batch_id: int
    job_ids: list[int]
    num_new_tokens: list[int]  # per job: its prompt, 1 in decode, or prompt + output after a drop
    context_lens: list[int]  # per job: tokens already in the KV cache
    sampling: BatchSampling
    input_ids: np.ndarray | None  # [sum(num_new_tokens)] int64; None when the core keeps no tokens
    freed_job_ids: list[int]  # ended jobs in no batch: their KV goes back to the pool
    run_order: list[int]  # live job ids, soonest expected to run first (empty when not asked for)
    in_flight_job_ids: list[int]  # jobs in batches still in the pipeline
    carry_from: list[int] = field(default_factory=list)  # per job: the in-flight batch whose sampled
    # token is this job's input (its input_ids entry is a placeholder), -1 = none; [] = no job carries


@dataclass
class StepOutput:
    """What one iteration produced: a token per job that ran, in order, or an error for all of them."""

    batch_id: int
    job_ids: list[int]
    token_ids: list[int]
    compute_s: float  # seconds of compute over all stages (0: the core uses the wall time it waited)
    error: str = ""
    failed_job_ids: list[int] = field(default_factory=list)  # jobs whose sampling failed: they alone end
    failure: str = ""
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)  # per job; [] = none asked

    def logprobs_of(self, row: int) -> TokenLogprobs | None:
        return self.logprobs[row] if self.logprobs else None


@dataclass
class Entry:
    """What the scheduler keeps for one job besides the policy's view of it."""

    job: Job
    tokens: list[int] | None  # prompt, then every sampled token; None when the core keeps no tokens
    sampling: SubmitJob
    stop_ids: frozenset[int]
    row: tuple = ()  # (temperature, top_k, top_p, seed, logprobs): its BatchSampling row, built once

    def __post_init__(self) -> None:
        s = self.sampling
        self.row = (s.temperature, s.top_k, s.top_p, s.seed, s.logprobs)


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
    carried: int = 0  # jobs put in a batch while their previous batch was in flight (overlap)
    compute_s: float = 0.0


class SchedulerCore:
    """Job pool and iteration bookkeeping around a policy; at most `num_stages` batches in flight."""

    def __init__(self, policy: Policy, num_stages: int, eos_token_ids: tuple[int, ...] = (),
                 send_run_order: bool | Callable[[list[Job]], bool] = True, keep_tokens: bool = True,
                 overlap: bool = False, first_batch_id: int = 0) -> None:
        self.policy = policy
        # Overlapped scheduling: a decode job whose batch is in flight may be picked for the next batch
        # at once; its input is the token that batch samples, which the stages hand to stage 0 (carry).
        self.overlap = overlap
        self.keep_tokens = keep_tokens  # the simulator has no token ids to move: lengths only
        policy.set_limits(num_stages, None)  # the KV capacity comes with the KV manager's report
        # Only swapping needs the run order, and it is O(jobs) per step: a flag, or a test of the picked
        # jobs (the simulator skips it while its plan cannot depend on the order).
        self.send_run_order = send_run_order
        self.num_stages = num_stages
        self.eos_token_ids = frozenset(eos_token_ids)
        self.entries: dict[int, Entry] = {}
        self.in_flight: dict[int, InFlight] = {}
        self.busy: dict[int, int] = {}  # job id -> in-flight batches it is in (2 only when carried)
        self.last_batch: dict[int, tuple[int, int]] = {}  # busy job -> (its latest batch id, new tokens there)
        self._oldest = -1  # oldest batch in flight when the current decision began
        self.blocked: set[int] = set()  # held back by the KV manager until memory changes
        self.to_free: list[int] = []  # ended jobs whose KV the next ScheduleBatch frees
        self.ended_in_flight: set[int] = set()  # ended while in a batch: free when the batch returns
        self.running: set[int] = set()  # jobs that ran in a recent batch (for counting preemptions)
        self.copies_in_flight = 0  # KV copies not yet acknowledged, as the KV manager last said
        self.next_batch_id = first_batch_id  # the scheduler's epoch: no id of an earlier incarnation recurs
        self.counters = Counters()

    # --- jobs in -------------------------------------------------------------------------------

    def submit(self, msg: SubmitJob, now: float, prompt_len: int | None = None,
               oracle_output_len: int | None = None) -> Job | None:
        """Admit a job; None when its id is already live. Without token ids (`keep_tokens` off) the
        prompt is `prompt_len` tokens long; `oracle_output_len` is the true length (simulator only)."""
        if msg.job_id in self.entries:
            # Ingress assigns job ids, so a second live one is forged or stale: answering with an error
            # under that id would end the innocent live job. It is dropped (the service logs it).
            self.counters.rejected += 1
            return None
        n = len(msg.prompt_ids) if prompt_len is None else prompt_len
        job = Job(msg.job_id, now, n, msg.max_tokens, oracle_output_len=oracle_output_len)
        stop = set(msg.stop_token_ids) | (set() if msg.ignore_eos else set(self.eos_token_ids))
        tokens = list(msg.prompt_ids) if self.keep_tokens else None
        self.entries[msg.job_id] = Entry(job, tokens, msg, frozenset(stop))
        self.policy.add(job, now)
        self.counters.submitted += 1
        return job

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
        self.last_batch.clear()
        self.to_free.extend(self.ended_in_flight)  # their batches never return: free their KV now
        self.ended_in_flight.clear()
        self.blocked.clear()
        events = []
        for entry in list(self.entries.values()):
            self._end(entry, JobStatus.FAILED, now)
            self.counters.failed += 1
            events.append(JobEvent(entry.job.job_id, [], "error", code, message))
        return events

    # --- batches out ---------------------------------------------------------------------------

    def can_send(self) -> bool:
        """One batch per stage in flight; with overlap one more, prepared while the others compute."""
        return len(self.in_flight) < self.num_stages + self.overlap

    def schedule(self, now: float) -> Step | None:
        """The next iteration, a housekeeping step when only frees are pending, or None."""
        if not self.can_send():
            return None
        self._oldest = min(self.in_flight, default=-1)  # the next batch to come back (carry source)
        picked = self.policy.schedule(now, self._can_run) if self.entries else []
        if not picked and self._retry_held(stalled=True):
            picked = self.policy.schedule(now, self._can_run)
        if not picked and not self.to_free:
            return None
        batch_id = self.next_batch_id
        self.next_batch_id += 1
        entries, busy, last_batch = self.entries, self.busy, self.last_batch
        in_flight = list(busy)  # before this batch's jobs join it
        # One pass builds every column: this runs each iteration for every job of the batch.
        carries = self.overlap and bool(busy)
        job_ids, context, new, steps, carry_from = [], [], [], [], []
        temperature, top_k, top_p, seed, logprobs = [], [], [], [], []
        keep, inputs_list = self.keep_tokens, []
        carried, running = 0, JobStatus.RUNNING
        for job in picked:
            job_id, computed, generated = job.job_id, job.num_computed, job.num_generated
            n = job.prompt_len + generated - computed  # num_new_tokens
            entry = entries[job_id]
            if carries and job_id in busy:
                # A carried job's batch in flight computes 1 token and samples 1: this batch computes the
                # sampled one, which stage 0 takes from the last stage (carry_from names the batch).
                carry_from.append(last_batch[job_id][0])
                computed += 1
                generated += 1
                carried += 1
                if keep:
                    inputs_list.append(0)  # a placeholder: stage 0 fills in the carried token
            else:
                carry_from.append(-1)
                if keep:
                    inputs_list += entry.tokens[computed : computed + n]
            job_ids.append(job_id)
            context.append(computed)
            new.append(n)
            steps.append(generated)
            t, k, p, sd, lp = entry.row
            temperature.append(t)
            top_k.append(k)
            top_p.append(p)
            seed.append(sd)
            logprobs.append(lp)
            job.status = running
            busy[job_id] = busy.get(job_id, 0) + 1
            last_batch[job_id] = (batch_id, n)
        if carried:
            self.counters.carried += carried
        else:
            carry_from = []
        sampling = BatchSampling(temperature, top_k, top_p, seed, steps, logprobs)
        inputs = np.array(inputs_list, dtype=np.int64) if keep else None
        self._count_preemptions(set(job_ids))
        step = Step(
            batch_id=batch_id,
            job_ids=job_ids,
            num_new_tokens=new,
            context_lens=context,
            sampling=sampling,
            input_ids=inputs,
            freed_job_ids=self.to_free,
            run_order=[j.job_id for j in self.policy.run_order(now)] if picked and self._wants_order(picked) else [],
            in_flight_job_ids=in_flight,
            carry_from=carry_from,
        )
        self.to_free = []
        # A housekeeping step also flows through the pipeline, so it is in flight too.
        self.in_flight[batch_id] = InFlight(batch_id, list(job_ids), dict(zip(job_ids, new)), now)
        return step

    def _wants_order(self, picked: list[Job]) -> bool:
        order = self.send_run_order
        return order(picked) if callable(order) else order

    def _retry_held(self, stalled: bool = False, memory_changed: bool = False) -> bool:
        """The one rule for when jobs the KV side held back are asked again: memory changed (a copy
        landed, KV was freed or lost), or the pipeline stalled (nothing in flight and no copy pending,
        so no memory event can come). True when held jobs were released."""
        if not self.blocked:
            return False
        if memory_changed or stalled and not self.in_flight and not self.copies_in_flight:
            self.blocked.clear()
            return True
        return False

    def _can_run(self, job: Job) -> bool:
        job_id = job.job_id
        if job_id in self.blocked:
            return False
        count = self.busy.get(job_id, 0)
        if not count:
            return True
        # Carry: in one batch in flight, in decode there, that batch does not produce its last token, and
        # it is the oldest in flight (the next to come back): stage 0 takes the carried token as that batch
        # leaves the last stage, about when stage 0 is free again. Carrying from a younger batch would
        # leave stage 0 idle until it has gone through every stage. And only into the extra batch, once
        # every stage has one: before that a batch for a free stage 0 would wait for its source to cross
        # all the stages, and the pipeline would run one group of jobs at a time instead of one per stage.
        if not (self.overlap and count == 1) or len(self.in_flight) < self.num_stages:
            return False
        batch_id, new = self.last_batch[job_id]
        return new == 1 and job.num_generated + 1 < job.max_tokens and batch_id == self._oldest

    def _busy_done(self, job_ids: list[int]) -> None:
        """One in-flight batch of each of these jobs is over (returned, held back, or lost)."""
        busy, last_batch = self.busy, self.last_batch
        for job_id in job_ids:
            count = busy.get(job_id, 0) - 1
            if count > 0:
                busy[job_id] = count
            else:
                busy.pop(job_id, None)
                last_batch.pop(job_id, None)

    def _count_preemptions(self, chosen: set[int]) -> None:
        """A job that ran and is in no batch now was preempted at this iteration boundary."""
        for job_id in self.running - chosen - self.busy.keys():
            self.running.discard(job_id)
            entry = self.entries.get(job_id)
            if entry is not None:
                entry.job.status = JobStatus.PREEMPTED
                entry.job.preemptions += 1
                self.counters.preemptions += 1
        self.running |= chosen

    # --- results back --------------------------------------------------------------------------

    def planned(self, batch_id: int, held_job_ids: list[int], dropped_job_ids: list[int],
                copies_in_flight: int) -> None:
        """The KV side left some picked jobs out: they are free to be picked again once memory changes."""
        flight = self.in_flight.get(batch_id)
        if flight is None:
            return  # a batch lost to a stage restart: its jobs are runnable again already
        for job_id in held_job_ids:
            if job_id in flight.new_tokens:
                flight.job_ids.remove(job_id)
                del flight.new_tokens[job_id]
                self._busy_done([job_id])
                if job_id in self.busy and self.last_batch[job_id][0] == batch_id:
                    # the job's earlier batch is still in flight: it is the latest one again
                    self.last_batch[job_id] = (self._earlier_batch(job_id, batch_id), 1)
                self._release_if_ended(job_id)
                if job_id in self.entries:
                    self.blocked.add(job_id)
                    self.counters.held_back += 1
        self._recompute(dropped_job_ids)
        self.copies_in_flight = copies_in_flight

    def set_capacity(self, msg: KVCapacity) -> None:
        """The KV manager's pools (sent when it starts, and again after a restart): starts follow them."""
        capacity = Capacity(msg.device_blocks, msg.host_blocks, msg.block_size, msg.headroom_blocks)
        self.policy.set_limits(self.num_stages, capacity)

    def kv_changed(self, copies_in_flight: int, dropped_job_ids: list[int]) -> None:
        """A copy was acknowledged or KV was lost: jobs held back may fit or be resident now."""
        self.copies_in_flight = copies_in_flight
        self._recompute(dropped_job_ids)
        self._retry_held(memory_changed=True)

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
        self.busy.clear()
        self.last_batch.clear()
        for flight in self.in_flight.values():
            for job_id in flight.job_ids:
                self._release_if_ended(job_id)
        self.in_flight.clear()
        self.blocked.clear()

    def update(self, msg: StepOutput, now: float) -> list[JobEvent]:
        """Account one iteration's output: service to the policy, tokens to the jobs, finished jobs end."""
        flight = self.in_flight.pop(msg.batch_id, None)
        if flight is None:
            return []
        self._busy_done(flight.job_ids)
        if msg.error:  # a stage failed on this batch: its jobs end with `internal`, the rest go on
            events = []
            for job_id in flight.job_ids:
                entry = self.entries.get(job_id)
                if entry is not None:
                    self._end(entry, JobStatus.FAILED, now)
                    self.counters.failed += 1
                    events.append(JobEvent(job_id, [], "error", "internal", msg.error))
            self._release_ended(flight)  # jobs cancelled while in this batch
            return events
        counters = self.counters
        counters.iterations += 1
        counters.compute_s += msg.compute_s
        events = self._fail_sampling(msg, flight, now) if msg.failed_job_ids else []
        entries, new_tokens, finished = self.entries, flight.new_tokens, JobStatus.FINISHED
        ran, live, ended = 0, [], False  # jobs that ran; those of them that go on
        for job_id, token in zip(msg.job_ids, msg.token_ids):  # every job of every batch: kept inline
            entry = entries.get(job_id)
            if entry is None:
                continue  # cancelled while in flight, or its sampling failed
            ran += 1
            job = entry.job
            job.num_computed += new_tokens.get(job_id, 0)
            job.num_generated += 1
            if job.first_token_s is None:
                job.first_token_s = now
            if entry.tokens is not None:
                entry.tokens.append(token)  # the input of the next iteration, or of a recompute
            if token in entry.stop_ids:
                reason = "stop"
            elif job.num_generated >= job.max_tokens:
                reason = "length"
            else:
                live.append(job)
                events.append(JobEvent(job_id, [token], "", "", ""))
                continue
            self._end(entry, finished, now)
            counters.finished += 1
            ended = True
            events.append(JobEvent(job_id, [token], reason, "", ""))
        counters.tokens += ran
        if msg.logprobs:
            rows = {job_id: row for row, job_id in enumerate(msg.job_ids)}
            events = [e.with_logprobs(msg.logprobs_of(rows[e.job_id])) if e.job_id in rows and not e.error_code else e
                      for e in events]
        if ran:  # the policy sees the jobs as the iteration left them; those that ended are gone from it
            iteration_s = msg.compute_s if msg.compute_s > 0 else now - flight.sent_s
            self.policy.update(live, iteration_s, now)
        if self.ended_in_flight:
            self._release_ended(flight)
        # A finished job frees memory: held jobs may fit now. An iteration that ran nothing while no
        # other batch or copy is pending cannot be followed by any memory event, so retry then too.
        self._retry_held(stalled=not msg.job_ids, memory_changed=ended or bool(msg.failed_job_ids))
        return events

    def _fail_sampling(self, msg: StepOutput, flight: InFlight, now: float) -> list[JobEvent]:
        """Jobs whose sampling failed on the last stage end with `internal`; their batch-mates go on."""
        events = []
        for job_id in msg.failed_job_ids:
            entry = self.entries.get(job_id)
            if entry is not None and job_id in flight.new_tokens:
                self._end(entry, JobStatus.FAILED, now)
                self.counters.failed += 1
                events.append(JobEvent(job_id, [], "error", "internal", msg.failure or "sampling failed"))
        return events

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

    def _earlier_batch(self, job_id: int, batch_id: int) -> int:
        return max(b for b, f in self.in_flight.items() if b != batch_id and job_id in f.new_tokens)

    def _release_if_ended(self, job_id: int) -> None:
        if job_id in self.ended_in_flight and job_id not in self.busy:
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
        statuses = Counter(e.job.status for e in self.entries.values())
        return {
            "jobs_live": len(self.entries),
            # live jobs by status (held ones are counted under theirs too): never picked, in the latest batch
            # they could run in, left out of one after running; held = held back by the KV manager now
            "jobs_waiting": statuses[JobStatus.WAITING],
            "jobs_running": statuses[JobStatus.RUNNING],
            "jobs_preempted": statuses[JobStatus.PREEMPTED],
            "jobs_held": len(self.blocked),
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
            "jobs_carried": c.carried,
            "compute_s": c.compute_s,
            **{f"jobs_level_{level}": n for level, n in Counter(e.job.level for e in self.entries.values()).items()},
        }
