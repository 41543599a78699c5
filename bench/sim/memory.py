"""Memory models of the simulator: where a batch's KV lives and what moving it costs."""

from __future__ import annotations

from typing import Any, Collection, Protocol

from services.scheduler.job import Job
from services.scheduler.policies.base import Policy
from services.scheduler.policies.starts import Capacity


class Memory(Protocol):
    def admit(self, job: Job) -> bool:
        """False when the job can never fit (it is then rejected, as the real admission does)."""

    def prepare(self, batch: list[Job], policy: Policy, in_flight: Collection[int], now: float) -> tuple[list[Job], float]:
        """The part of `batch` that can run now, and the seconds of swap-in it must wait for."""

    def release(self, job: Job) -> None:
        """The job finished: free its KV."""

    def poll(self, now: float) -> bool:
        """Complete the copies due by `now`; True when memory changed (held jobs may fit)."""

    def next_ready_s(self) -> float:
        """When the earliest copy in flight completes (inf if none): a time worth waking up at."""

    def swaps_of(self, job: Job) -> int: ...

    def capacity(self) -> Capacity | None:
        """The pools the policy bounds starts by; None when memory is not the limit."""

    def stats(self) -> dict[str, Any]: ...


class UnlimitedMemory:
    """Every job's KV stays on the device: no holds, no swaps (an upper bound on what memory allows)."""

    def admit(self, job: Job) -> bool:
        return True

    def prepare(self, batch: list[Job], policy: Policy, in_flight: Collection[int], now: float) -> tuple[list[Job], float]:
        return batch, 0.0

    def release(self, job: Job) -> None:
        pass

    def poll(self, now: float) -> bool:
        return False

    def next_ready_s(self) -> float:
        return float("inf")

    def swaps_of(self, job: Job) -> int:
        return 0

    def capacity(self) -> Capacity | None:
        return None

    def stats(self) -> dict[str, Any]:
        return {"memory": "unlimited"}
