"""Discrete-event simulation of the serving loop over a cost model and a memory model.

The loop is the scheduler service's own: the simulator drives `SchedulerCore` (the class the
scheduler process runs, with the same policy object) through its iteration contract. Each step the
core decides goes through the memory model (the KV manager's planner in `kv` mode), the core hears
which jobs were held or dropped, the runnable jobs compute for the cost model's time, and the core
takes their output: one token per job, the end-of-sequence token at the job's true length. Time comes
from the cost model. With S pipeline stages a batch takes iteration_time / S per stage and up to S
disjoint batches are in flight (one more with `scheduler.overlap`, whose carried jobs wait for the batch
that samples their input): a new step starts whenever stage 0 is free.
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
from common.messages import SubmitJob
from services.scheduler.core import SchedulerCore, Step, StepOutput, overlaps
from services.scheduler.job import Job
from services.scheduler.policies.base import Policy

# Steps in a row that run nothing (every picked job held back) before the loop waits for time to pass.
MAX_EMPTY_STEPS = 4
EOS, TOKEN = 0, 1  # the simulated vocabulary: a job samples TOKEN until its true length, then EOS


@dataclass
class SimResult:
    records: list[RequestRecord]
    rejected: list[int]  # request ids refused at admission (can never fit the KV pool)
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class _InFlight:
    done_s: float
    batch_id: int
    jobs: list[Job]
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
        self.core = SchedulerCore(policy, self.stages, (EOS,), send_run_order=self.memory.needs_order,
                                  keep_tokens=False, overlap=overlaps(policy.config, self.stages))
        policy.set_limits(self.stages, self.memory.capacity())
        self.stage_free = [0.0] * self.stages
        self.batch_done: dict[int, float] = {}  # batch id -> when its tokens are sampled, while in flight
        self.jobs: dict[int, Job] = {}  # live jobs, by id
        self.events: list[tuple[float, int, _InFlight]] = []  # batch completions
        self.seq = 0
        self.first_scheduled: dict[int, float] = {}
        self.records: list[RequestRecord] = []
        self.rejected: list[int] = []
        self.iterations = 0
        self.busy_s = 0.0
        self.batch_jobs = 0
        self.decision_s = 0.0
        self.empty_steps = 0  # steps in a row that ran nothing at the current time
        self.empty_at = -1.0
        self.stuck_since: float | None = None

    def run(self) -> SimResult:
        wall = time.perf_counter()
        requests = self.workload.requests
        n, i, now = len(requests), 0, 0.0
        while i < n or self.events or not self.core.idle:
            t = max(now, self.stage_free[0])
            while i < n and requests[i].arrival_s <= t or self.events and self.events[0][0] <= t:
                if self.events and (i >= n or self.events[0][0] <= requests[i].arrival_s):
                    self.complete(heapq.heappop(self.events)[2])
                else:
                    self.arrive(requests[i])
                    i += 1
            if self.launch(t):
                now = t
                continue
            # nothing can run now: jump to the next arrival or completion
            nxt = min(
                requests[i].arrival_s if i < n else float("inf"),
                self.events[0][0] if self.events else float("inf"),
                self.memory.next_ready_s(),
            )
            if nxt == float("inf"):
                if self.core.idle:
                    break
                nxt = self.wait_for_policy(t)
            now = nxt
        return SimResult(self.records, self.rejected, self.summary(time.perf_counter() - wall))

    def wait_for_policy(self, t: float) -> float:
        """Nothing will happen by itself, but the held jobs may be reordered (starvation promotion),
        as the real loop would see while idling: step the clock by the check period, up to a bound."""
        config = self.policy.config
        if self.stuck_since is None:
            self.stuck_since = t
        if t - self.stuck_since > config.starvation_limit_s + 2 * config.starvation_check_s:
            raise RuntimeError(f"simulation stuck at t={t:.3f}s: {len(self.jobs)} jobs held, none can run and nothing in flight")
        return t + config.starvation_check_s

    def arrive(self, request: Request) -> None:
        # A client does not know the output length: it bounds it by what the context has left (as
        # the paper's Orca reserves for); the job ends at its true length, which only the oracle sees.
        max_tokens = max(request.output_len, self.max_context - request.input_len)
        if not self.memory.admit(request.input_len + max_tokens):
            self.rejected.append(request.request_id)
            return
        msg = SubmitJob(request.request_id, [], max_tokens, 0.0, 0, 1.0, None, [], False)
        job = self.core.submit(msg, request.arrival_s, prompt_len=request.input_len,
                               oracle_output_len=request.output_len)
        self.jobs[job.job_id] = job

    def launch(self, t: float) -> bool:
        """Let the core decide one step at time t, plan its memory and start its compute; False when
        there is nothing to start now."""
        if t != self.empty_at:
            self.empty_steps, self.empty_at = 0, t
        if self.empty_steps >= MAX_EMPTY_STEPS:
            return False
        if self.memory.poll(t):
            self.core.kv_changed(self.memory.copies_in_flight(), [])
        t0 = time.perf_counter()
        step = self.core.schedule(t)
        self.decision_s += time.perf_counter() - t0
        if step is None:
            return False
        rows, held, dropped, wait_s = self.memory.plan(step, t)
        self.core.planned(step.batch_id, held, dropped, self.memory.copies_in_flight())
        if not rows:  # housekeeping, or every picked job held back: the step ends at once
            self.empty_steps += bool(step.job_ids)
            self.core.update(StepOutput(step.batch_id, [], [], 0.0), t)
            return True
        self.start(step, rows, t + wait_s, t)
        return True

    def start(self, step: Step, rows: tuple[int, ...], ready: float, t: float) -> None:
        """The runnable jobs of a step compute through the stages, once their uploads have landed."""
        batch = [self.jobs[step.job_ids[r]] for r in rows]
        for r in rows:  # overlap: a carried job's input is the token its batch in flight samples
            if step.carry_from and step.carry_from[r] >= 0:
                ready = max(ready, self.batch_done.get(step.carry_from[r], ready))
        prefill, decode = [], []
        for job in batch:
            if job.is_prefill:
                prefill.append(job.num_new_tokens)
            else:
                decode.append(job.context_len)
            self.first_scheduled.setdefault(job.job_id, t)
        iteration_s = self.cost.iteration_time(prefill, decode)
        stage_s = iteration_s / self.stages
        for k in range(self.stages):
            ready = max(ready, self.stage_free[k]) + stage_s
            self.stage_free[k] = ready
        self.stuck_since = None
        self.iterations += 1
        self.busy_s += iteration_s
        self.batch_jobs += len(batch)
        self.seq += 1
        self.batch_done[step.batch_id] = ready
        heapq.heappush(self.events, (ready, self.seq, _InFlight(ready, step.batch_id, batch, iteration_s)))

    def complete(self, flight: _InFlight) -> None:
        now = flight.done_s
        self.batch_done.pop(flight.batch_id, None)
        tokens = [EOS if job.num_generated + 1 >= job.expected_output_len else TOKEN for job in flight.jobs]
        out = StepOutput(flight.batch_id, [job.job_id for job in flight.jobs], tokens, flight.iteration_s)
        for event in self.core.update(out, now):
            if event.finish_reason:
                self.records.append(self.record(self.jobs.pop(event.job_id)))

    def record(self, job: Job) -> RequestRecord:
        return RequestRecord(
            request_id=job.job_id,
            arrival_s=job.arrival_s,
            first_scheduled_s=self.first_scheduled.pop(job.job_id),
            first_token_s=job.first_token_s,
            finish_s=job.finish_s,
            input_len=job.prompt_len,
            output_len=job.num_generated,
            preemptions=job.preemptions,
            swaps=self.memory.swaps_of(job.job_id),
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
