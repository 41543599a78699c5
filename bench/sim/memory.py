"""Memory models of the simulator: where a step's KV lives and what moving it costs."""

from __future__ import annotations

from typing import Any, Protocol

from services.scheduler.core import Step
from services.scheduler.job import Job
from services.scheduler.policies.starts import Capacity

# What a memory model answers for one step: the rows that run, the jobs held back, the jobs whose KV
# was dropped, and the seconds the compute waits for uploads.
StepMemory = tuple[tuple[int, ...], list[int], list[int], float]


class Memory(Protocol):
    def admit(self, num_tokens: int) -> bool:
        """False when a job of this many tokens (prompt + max_tokens) can never fit: it is rejected."""

    def plan(self, step: Step, now: float) -> StepMemory:
        """Free the step's ended jobs and plan its KV, as the KV manager does with a ScheduleBatch."""

    def needs_order(self, picked: list[Job]) -> bool:
        """Whether the plan of these picked jobs can depend on the run order (else it is not built)."""

    def copies_in_flight(self) -> int: ...

    def poll(self, now: float) -> bool:
        """Complete the copies due by `now`; True when memory changed (held jobs may fit)."""

    def next_ready_s(self) -> float:
        """When the earliest copy in flight completes (inf if none): a time worth waking up at."""

    def swaps_of(self, job_id: int) -> int: ...

    def capacity(self) -> Capacity | None:
        """The pools the policy bounds starts by; None when memory is not the limit."""

    def stats(self) -> dict[str, Any]: ...


class UnlimitedMemory:
    """Every job's KV stays on the device: no holds, no swaps (an upper bound on what memory allows)."""

    def admit(self, num_tokens: int) -> bool:
        return True

    def plan(self, step: Step, now: float) -> StepMemory:
        return tuple(range(len(step.job_ids))), [], [], 0.0

    def needs_order(self, picked: list[Job]) -> bool:
        return False

    def copies_in_flight(self) -> int:
        return 0

    def poll(self, now: float) -> bool:
        return False

    def next_ready_s(self) -> float:
        return float("inf")

    def swaps_of(self, job_id: int) -> int:
        return 0

    def capacity(self) -> Capacity | None:
        return None

    def stats(self) -> dict[str, Any]:
        return {"memory": "unlimited"}
