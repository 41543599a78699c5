"""Finite KV memory for the simulator: the real KV planner and books, with copies timed by the cost model.

Every step the scheduler core decides goes through `services.kvcache.Planner.plan_step` exactly as the KV
manager does it: jobs may be held back, offloads and uploads are started, and (in recompute mode)
KV is dropped. Copies run on one host-device link per direction, each taking
`cost.swap_time(blocks * block_size)`; a copy is acknowledged for every stage when it completes.
Uploads the planner starts for jobs predicted to run soon overlap computation; in reactive mode a
picked job's upload delays the start of its batch.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections import Counter
from typing import Any, Callable

from bench.costmodel import CostModel
from common.config import CacheConfig, SchedulerConfig
from services.kvcache.books import Direction, KVBooks
from services.kvcache.planner import Planner
from bench.sim.memory import StepMemory
from services.scheduler.core import Step
from services.scheduler.job import Job
from services.scheduler.policies.starts import Capacity

# Host pool size relative to the device pool when the device pool comes from a roofline's
# capacity (a GPU server has several times more host memory than GPU memory).
HOST_TO_DEVICE = 4


class KVMemory:
    def __init__(self, planner: Planner, cost: CostModel) -> None:
        self.planner = planner
        self.books = planner.books
        self.cost = cost
        self.link_free = {Direction.OUT: 0.0, Direction.IN: 0.0}
        self.copies: list[tuple[float, int]] = []  # (done time, op id)
        self.done_at: dict[int, float] = {}  # op id -> done time, for copies in flight
        self.copy_s = 0.0
        self.swaps: Counter[int] = Counter()
        self.rejected = 0

    def admit(self, num_tokens: int) -> bool:
        if self.planner.can_ever_fit(num_tokens):
            return True
        self.rejected += 1
        return False

    def next_ready_s(self) -> float:
        return self.copies[0][0] if self.copies else float("inf")

    def poll(self, now: float) -> bool:
        """Acknowledge, on every stage, each copy that has finished by `now`; True if any did."""
        landed = False
        while self.copies and self.copies[0][0] <= now:
            _, op_id = heapq.heappop(self.copies)
            del self.done_at[op_id]
            for stage in range(self.books.num_stages):
                self.planner.ack(op_id, stage)
            landed = True
        return landed

    def copies_in_flight(self) -> int:
        return len(self.done_at)

    def plan(self, step: Step, now: float) -> StepMemory:
        """The KV manager's answer to a step (`Planner.plan_step`), with copies timed on the links."""
        planned = self.planner.plan_step(step.freed_job_ids, step.job_ids, step.context_lens,
                                         step.num_new_tokens, step.run_order, step.in_flight_job_ids)
        plan = planned.plan
        for op in (*plan.swap_out, *plan.swap_in):
            start = max(now, self.link_free[op.direction])
            seconds = self.cost.swap_time(len(op.pairs) * self.books.block_size)
            done = self.link_free[op.direction] = start + seconds
            self.copy_s += seconds
            heapq.heappush(self.copies, (done, op.op_id))
            self.done_at[op.op_id] = done
            self.swaps[op.job_id] += 1
        wait = 0.0
        for job_id in plan.block_tables:  # compute waits for the uploads of the jobs it runs
            entry = self.books.get(job_id)
            if entry.op_id is not None:
                wait = max(wait, self.done_at[entry.op_id] - now)
        return planned.rows, list(planned.held), list(plan.dropped), wait

    def needs_order(self, picked: list[Job]) -> bool:
        """Whether the plan can depend on the run order. It cannot while nothing is on the host or
        moving and the batch's new blocks leave the headroom free: then the planner neither offloads
        nor uploads, so the O(n) run order is skipped (the plan is the same without it)."""
        books = self.books
        if books.host.num_used or self.copies or books.releasing:
            return True
        need = sum(books.extra_blocks(job.job_id, job.context_len) for job in picked)
        return books.device.num_free - need <= self.planner.headroom

    def capacity(self) -> Capacity:
        books = self.books
        return Capacity(books.device.num_blocks, books.host.num_blocks, books.block_size, self.planner.headroom)

    def swaps_of(self, job_id: int) -> int:
        return self.swaps.pop(job_id, 0)

    def stats(self) -> dict[str, Any]:
        s = self.planner.stats()
        keep = ("device_blocks_total", "host_blocks_total", "swaps_out", "swaps_in", "dropped", "held", "offload_iterations", "upload_iterations")
        return {"memory": f"kv-{self.planner.mode}", "copy_s": self.copy_s, **{k: s[k] for k in keep if k in s}}


def kv_memory_factory(cache: CacheConfig, scheduler: SchedulerConfig, cost: CostModel) -> Callable[[], KVMemory]:
    """Fresh KV memory per run. The device pool holds cost.kv_capacity_tokens when the cost model
    knows it (roofline), else cache.num_gpu_blocks; the host pool is then HOST_TO_DEVICE times that."""
    device, host = cache.num_gpu_blocks, cache.num_host_blocks
    if cost.kv_capacity_tokens:
        device = max(cost.kv_capacity_tokens // cache.block_size, 1)
        host = HOST_TO_DEVICE * device
    cache = dataclasses.replace(cache, num_gpu_blocks=device, num_host_blocks=host)

    def make() -> KVMemory:
        books = KVBooks(cache.num_gpu_blocks, cache.num_host_blocks, cache.block_size, cost.num_stages)
        return KVMemory(Planner(books, cache.swap, cache.headroom_blocks, scheduler.max_jobs, cache.upload_wait), cost)

    return make
