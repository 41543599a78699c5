"""Discrete-event simulation of the scheduler's iteration loop over a cost model and a memory model.

The loop is the real scheduler's: pick a batch with the policy (the same class the service uses),
make it memory-feasible, run it, then feed back sampled tokens and account service. Time comes
from the cost model. With S pipeline stages a batch takes iteration_time / S per stage and up to
S disjoint batches are in flight: a new batch starts whenever stage 0 is free, from the jobs that
are not already in flight.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field
from typing import Any

from bench.costmodel import CostModel
from bench.metrics import RequestRecord
from bench.sim.memory import Memory, UnlimitedMemory
from bench.workloads import Request, Workload
from services.scheduler.job import Job, JobStatus
from services.scheduler.policies.base import Policy

# Attempts per iteration to find a batch when the memory model holds back every picked job.
MAX_PICKS = 4


@dataclass
class SimResult:
    records: list[RequestRecord]
    rejected: list[int]  # request ids refused at admission (can never fit the KV pool)
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class _InFlight:
    done_s: float
    batch: list[Job]
    iteration_s: float


class Simulator:
    """One run of one policy over one workload; `run()` returns per-request records."""

    def __init__(self, workload: Workload, policy: Policy, cost: CostModel, memory: Memory | None = None) -> None:
        if len(policy):
            raise ValueError("the policy must start empty")
        self.workload = workload
        self.policy = policy
        self.cost = cost
        self.memory = memory or UnlimitedMemory()
        self.stages = cost.num_stages
        self.max_context = int(workload.info.get("max_context", 0) or 0)  # 0: no bound, max_tokens = output
        policy.set_limits(self.stages, self.memory.capacity())
        self.stage_free = [0.0] * self.stages
        self.in_flight: set[int] = set()
        self.ran_last: dict[int, Job] = {}  # jobs whose last batch finished and that could run again
        self.events: list[tuple[float, int, _InFlight]] = []  # batch completions
        self.seq = 0
        self.first_scheduled: dict[int, float] = {}
        self.records: list[RequestRecord] = []
        self.rejected: list[int] = []
        self.iterations = 0
        self.busy_s = 0.0
        self.batch_jobs = 0
        self.decision_s = 0.0
        self.stuck_since: float | None = None
        self.held: set[int] = set()  # held back by memory since memory last changed

    def can_run(self, job: Job) -> bool:
        return job.job_id not in self.in_flight and job.job_id not in self.held

    def pick(self, t: float) -> tuple[list[Job], float]:
        """The policy's batch after the memory model. As in the scheduler service, jobs the memory
        model holds back are not picked again until memory changes (a copy lands, a job finishes,
        or the loop stalls); if every picked job is held the policy is asked again at once, a
        bounded number of times (the service would send an empty iteration instead)."""
        if self.memory.poll(t):
            self.held.clear()
        for _ in range(MAX_PICKS):
            t0 = time.perf_counter()
            picked = self.policy.schedule(t, self.can_run)
            self.decision_s += time.perf_counter() - t0
            batch, swap_s = self.memory.prepare(picked, self.policy, self.in_flight, t)
            if len(batch) < len(picked):
                ran = {job.job_id for job in batch}
                self.held.update(job.job_id for job in picked if job.job_id not in ran)
            if batch or not picked:
                return batch, swap_s
        return [], 0.0

    def run(self) -> SimResult:
        wall = time.perf_counter()
        requests = self.workload.requests
        n, i, now = len(requests), 0, 0.0
        while i < n or self.events or len(self.policy):
            t = max(now, self.stage_free[0])
            while i < n and requests[i].arrival_s <= t or self.events and self.events[0][0] <= t:
                if self.events and (i >= n or self.events[0][0] <= requests[i].arrival_s):
                    self.complete(heapq.heappop(self.events)[2])
                else:
                    self.arrive(requests[i])
                    i += 1
            if self.launch(t):
                now, self.stuck_since = t, None
                continue
            # nothing can run now: jump to the next arrival or completion
            nxt = min(
                requests[i].arrival_s if i < n else float("inf"),
                self.events[0][0] if self.events else float("inf"),
                self.memory.next_ready_s(),
            )
            if nxt == float("inf"):
                if not len(self.policy):
                    break
                nxt = self.wait_for_policy(t)
            if not self.events and self.memory.next_ready_s() == float("inf"):
                self.held.clear()  # stalled: nothing in flight or moving, so ask the held jobs again
            now = nxt
        return SimResult(self.records, self.rejected, self.summary(time.perf_counter() - wall))

    def wait_for_policy(self, t: float) -> float:
        """Nothing will happen by itself, but the held jobs may be reordered (starvation promotion),
        as the real loop would see while idling: step the clock by the check period, up to a bound."""
        config = self.policy.config
        if self.stuck_since is None:
            self.stuck_since = t
        if t - self.stuck_since > config.starvation_limit_s + 2 * config.starvation_check_s:
            held = len(self.policy)
            raise RuntimeError(f"simulation stuck at t={t:.3f}s: {held} jobs held, none can run and nothing in flight")
        return t + config.starvation_check_s

    def arrive(self, request: Request) -> None:
        # A client does not know the output length: it bounds it by what the context has left (as
        # the paper's Orca reserves for); the job ends at its true length, which only the oracle sees.
        max_tokens = max(request.output_len, self.max_context - request.input_len)
        job = Job(
            job_id=request.request_id,
            arrival_s=request.arrival_s,
            prompt_len=request.input_len,
            max_tokens=max_tokens,
            oracle_output_len=request.output_len,
        )
        if not self.memory.admit(job):
            job.status = JobStatus.FAILED
            self.rejected.append(job.job_id)
            return
        self.policy.add(job, request.arrival_s)

    def launch(self, t: float) -> bool:
        """Pick, make memory-feasible and start one batch at time t; False when nothing can run."""
        batch, swap_s = self.pick(t)
        if not batch:
            return False
        for job in self.ran_last.values():
            if job not in batch:
                job.status = JobStatus.PREEMPTED
                job.preemptions += 1
        self.ran_last.clear()
        prefill, decode = [], []
        for job in batch:
            if job.is_prefill:
                prefill.append(job.num_new_tokens)
            else:
                decode.append(job.context_len)
        iteration_s = self.cost.iteration_time(prefill, decode)
        stage_s = iteration_s / self.stages
        # swaps ride on their own stream; a batch cannot start before its uploads have landed
        ready = t + swap_s
        for k in range(self.stages):
            ready = max(ready, self.stage_free[k]) + stage_s
            self.stage_free[k] = ready
        for job in batch:
            self.in_flight.add(job.job_id)
            self.first_scheduled.setdefault(job.job_id, t)
            job.status = JobStatus.RUNNING
        self.iterations += 1
        self.busy_s += iteration_s
        self.batch_jobs += len(batch)
        self.seq += 1
        heapq.heappush(self.events, (ready, self.seq, _InFlight(ready, batch, iteration_s)))
        return True

    def complete(self, flight: _InFlight) -> None:
        now = flight.done_s
        for job in flight.batch:
            self.in_flight.discard(job.job_id)
            job.num_computed = job.context_len
            job.num_generated += 1
            if job.first_token_s is None:
                job.first_token_s = now
        self.policy.update(flight.batch, flight.iteration_s, now)
        for job in flight.batch:
            if job.num_generated >= job.expected_output_len:
                job.status = JobStatus.FINISHED
                job.finish_s = now
                self.policy.remove(job)
                self.memory.release(job)
                self.records.append(self.record(job))
                self.held.clear()  # its KV is freed: held jobs may fit now
            else:
                self.ran_last[job.job_id] = job

    def record(self, job: Job) -> RequestRecord:
        return RequestRecord(
            request_id=job.job_id,
            arrival_s=job.arrival_s,
            first_scheduled_s=self.first_scheduled[job.job_id],
            first_token_s=job.first_token_s,
            finish_s=job.finish_s,
            input_len=job.prompt_len,
            output_len=job.num_generated,
            preemptions=job.preemptions,
            swaps=self.memory.swaps_of(job),
        )

    def summary(self, wall_s: float) -> dict[str, Any]:
        return {
            "iterations": self.iterations,
            "mean_batch_jobs": self.batch_jobs / self.iterations if self.iterations else 0.0,
            "busy_s": self.busy_s,
            "wall_s": wall_s,
            "decision_us_mean": 1e6 * self.decision_s / self.iterations if self.iterations else 0.0,
            "rejected": len(self.rejected),
            **self.memory.stats(),
        }


def simulate(workload: Workload, policy: Policy, cost: CostModel, memory: Memory | None = None) -> SimResult:
    return Simulator(workload, policy, cost, memory).run()
