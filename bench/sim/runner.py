"""Run one workload under several policies (same requests, fresh jobs) and summarize each run."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from bench.costmodel import CostModel
from bench.metrics import SLO, summarize
from bench.sim.engine import simulate
from bench.sim.memory import Memory
from bench.workloads import Workload
from common.config import SchedulerConfig
from services.scheduler.policies import make_policy

MemoryFactory = Callable[[], Memory | None]


def run_policies(
    workload: Workload,
    cost: CostModel,
    scheduler: SchedulerConfig,
    policies: Sequence[str],
    memory: MemoryFactory = lambda: None,
    slo: SLO | None = None,
) -> dict[str, Any]:
    """{policy: summary + "sim" stats} for each policy, in the order given."""
    out: dict[str, Any] = {}
    for name in policies:
        config = dataclasses.replace(scheduler, policy=name)
        policy = make_policy(config, cost.prefill_time)
        result = simulate(workload, policy, cost, memory())
        summary = summarize(result.records, slo)
        summary["sim"] = result.stats
        if hasattr(policy, "demotions"):
            summary["sim"].update(demotions=policy.demotions, promotions=policy.promotions,
                                  first_demotions=policy.first_demotions)
        out[name] = summary
    return out


def ratios(results: dict[str, Any], baseline: str, metric: str = "jct_s") -> dict[str, dict[str, float]]:
    """baseline's mean and p99 of `metric` divided by each policy's (how many times lower)."""
    base = results[baseline][metric]
    return {
        name: {k: base[k] / r[metric][k] if r[metric][k] > 0 else float("inf") for k in ("mean", "p99")}
        for name, r in results.items()
    }
