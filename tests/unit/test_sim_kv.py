"""The simulator driving the real KV planner: holds, swaps, drops and admission on a tiny pool."""

from __future__ import annotations

import pytest

from bench.sim.engine import simulate
from bench.sim.kv import kv_memory_factory
from bench.sim.memory import UnlimitedMemory
from bench.workloads import DEFAULT_TRACES, Request, Workload
from common.config import CacheConfig, SchedulerConfig
from services.scheduler.policies import make_policy


class SmallCost:
    """1 s iterations, 0.1 s per 16-token block copied, 64 KV tokens (4 blocks of 16) on device."""

    num_stages = 1
    kv_capacity_tokens = 64

    def iteration_time(self, prefill_lens, decode_contexts):
        return 1.0

    def prefill_time(self, input_len):
        return 0.001 * input_len

    def swap_time(self, num_tokens):
        return 0.1 * num_tokens / 16

    def describe(self):
        return {"kind": "small"}


def run(mode, rows, policy="mlfq", max_jobs=2, headroom=0):
    cost = SmallCost()
    sched = SchedulerConfig(policy=policy, max_jobs=max_jobs, base_quantum_s=0.5)
    memory = kv_memory_factory(CacheConfig(block_size=16, swap=mode, headroom_blocks=headroom), sched, cost)()
    wl = Workload(tuple(Request(i, a, p, o) for i, (a, p, o) in enumerate(rows)))
    return simulate(wl, make_policy(sched, cost.prefill_time), cost, memory), memory


@pytest.mark.parametrize("mode", ["proactive", "reactive", "recompute", "defer"])
def test_every_mode_finishes_all_jobs_and_returns_all_blocks(mode):
    # three jobs of 2-3 blocks each on a 4-block device: they cannot all be resident at once
    rows = [(0.0, 30, 6), (0.0, 30, 6), (0.5, 40, 4), (3.0, 20, 3)]
    result, memory = run(mode, rows)
    assert sorted(r.request_id for r in result.records) == [0, 1, 2, 3]
    assert [r.output_len for r in sorted(result.records, key=lambda r: r.request_id)] == [6, 6, 4, 3]
    memory.poll(float("inf"))
    assert memory.planner.is_whole()


def test_proactive_swaps_are_counted_per_request_and_take_link_time():
    rows = [(0.0, 30, 6), (0.0, 30, 6), (0.5, 40, 4)]
    result, memory = run("proactive", rows)
    stats = result.stats
    assert stats["swaps_out"] > 0 and stats["swaps_out"] == stats["swaps_in"]
    assert sum(r.swaps for r in result.records) == stats["swaps_out"] + stats["swaps_in"]
    assert stats["copy_s"] == pytest.approx(0.1 * (memory.planner.books.counters["blocks_out"] + memory.planner.books.counters["blocks_in"]))


def test_recompute_drops_and_redoes_prefill():
    rows = [(0.0, 30, 6), (0.0, 30, 6), (0.5, 40, 4)]
    result, _ = run("recompute", rows)
    assert result.stats["dropped"] > 0 and result.stats["swaps_out"] == 0


def test_job_that_can_never_fit_is_rejected_at_admission():
    result, _ = run("proactive", [(0.0, 60, 10), (0.0, 10, 2)])
    assert result.rejected == [0]
    assert [r.request_id for r in result.records] == [1]


def test_a_stuck_memory_state_is_reported_not_looped():
    class HoldAll(UnlimitedMemory):
        def plan(self, step, now):
            return (), list(step.job_ids), [], 0.0

    wl = Workload((Request(0, 0.0, 4, 2),))
    sched = SchedulerConfig(policy="fcfs")
    with pytest.raises(RuntimeError, match="stuck at t=3.2"):
        simulate(wl, make_policy(sched), SmallCost(), HoldAll())


@pytest.mark.skipif(not (DEFAULT_TRACES / "mooncake_conversation.csv").is_file(), reason="shared traces not present")
def test_skip_join_does_not_collapse_on_mooncake_under_memory_pressure():
    """Mooncake conversations at 3 req/s on one H100 with Llama-3-8B: with unbounded starts skip-join
    started ~490 jobs at once, swapped 120,000 times and took 2,696 s mean JCT against 38 s for fcfs."""
    from bench import workloads
    from bench.costmodel import roofline
    from bench.sim.runner import run_policies

    wl = workloads.trace("mooncake-conv", rate=3.0, max_context=8192, limit=1000)
    cost = roofline(gpu="H100-80GB", model="llama3-8b", tp=1, pp=1)
    sched = SchedulerConfig()
    results = run_policies(wl, cost, sched, ["skip-join-mlfq", "fcfs"], kv_memory_factory(CacheConfig(), sched, cost))
    sj, fcfs = (results[p]["jct_s"]["mean"] for p in ("skip-join-mlfq", "fcfs"))
    assert results["skip-join-mlfq"]["num_requests"] == results["fcfs"]["num_requests"] == 1000
    assert sj <= 1.1 * fcfs, (sj, fcfs)
