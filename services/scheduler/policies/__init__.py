"""Scheduling policies by name; `make_policy` builds the one the config names."""

from __future__ import annotations

from common.config import SchedulerConfig
from services.scheduler.policies.base import Policy, PrefillTime
from services.scheduler.policies.fcfs import FCFS, Orca, RunToCompletion
from services.scheduler.policies.mlfq import MLFQ, SkipJoinMLFQ
from services.scheduler.policies.srpt import SRPTOracle

POLICY_CLASSES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (SkipJoinMLFQ, MLFQ, FCFS, Orca, RunToCompletion, SRPTOracle)
}


def make_policy(config: SchedulerConfig, prefill_time: PrefillTime | None = None) -> Policy:
    """The policy named by config.policy, given the batch-1 prefill time (None: no profile)."""
    config.validate()
    cls = POLICY_CLASSES.get(config.policy)
    if cls is None:
        raise ValueError(f"unknown policy {config.policy!r}; use one of {', '.join(POLICY_CLASSES)}")
    return cls(config, prefill_time)


__all__ = ["MLFQ", "FCFS", "Orca", "Policy", "POLICY_CLASSES", "RunToCompletion", "SRPTOracle", "SkipJoinMLFQ", "make_policy"]
