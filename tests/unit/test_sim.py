"""The simulator on tiny workloads whose per-policy JCTs are worked out by hand."""

from __future__ import annotations

import json

import pytest

from bench.costmodel import roofline
from bench.sim import cli
from bench.sim.engine import simulate
from bench.sim.runner import run_policies
from bench.workloads import Request, Workload, synthetic
from common.config import SchedulerConfig
from services.scheduler.policies import make_policy


class FixedCost:
    """Every iteration takes `iteration_s` whatever the batch; prefill time is 10 ms per token."""

    kv_capacity_tokens = 0

    def __init__(self, iteration_s: float = 1.0, num_stages: int = 1) -> None:
        self.iteration_s, self.num_stages = iteration_s, num_stages

    def iteration_time(self, prefill_lens, decode_contexts):
        return self.iteration_s

    def prefill_time(self, input_len):
        return 0.01 * input_len

    def swap_time(self, num_tokens):
        return 0.0

    def describe(self):
        return {"kind": "fixed"}


def workload(*rows):
    return Workload(tuple(Request(i, a, p, o) for i, (a, p, o) in enumerate(rows)))


# A: t=0, prefill 1.0 s, 3 tokens; B: t=0.5, prefill 1.5 s, 1 token; C: t=2.5, prefill 0.1 s, 2 tokens.
# One job per iteration of 1 s; quanta 0.5, 1, 2, 4 s. See docs/SIMULATOR.md for the timelines.
ABC = workload((0.0, 100, 3), (0.5, 150, 1), (2.5, 10, 2))
HAND_JCT = {
    "fcfs": [3.0, 3.5, 3.5],  # A 0-3, B 3-4, C 4-6
    "rtc": [3.0, 3.5, 3.5],
    "srpt-oracle": [4.0, 1.5, 3.5],  # A 0-1, B 1-2, A 2-4, C 4-6
    "mlfq": [6.0, 1.5, 2.5],  # A 0-1 (demoted), B 1-2, A 2-3, C 3-5, A 5-6
    "skip-join-mlfq": [3.0, 5.5, 2.5],  # A joins 1, B joins 2, C joins 0: A 0-3, C 3-5, B 5-6
}


@pytest.mark.parametrize("name", sorted(HAND_JCT))
def test_hand_checked_jct_per_policy(name):
    config = SchedulerConfig(policy=name, max_jobs=1, base_quantum_s=0.5, num_levels=4, starvation_limit_s=100.0)
    cost = FixedCost()
    result = simulate(ABC, make_policy(config, cost.prefill_time), cost)
    jct = {r.request_id: r.jct_s for r in result.records}
    assert [jct[i] for i in range(3)] == pytest.approx(HAND_JCT[name])


def test_preemptions_counted_when_a_job_that_ran_is_left_out():
    config = SchedulerConfig(policy="mlfq", max_jobs=1, base_quantum_s=0.5, num_levels=4, starvation_limit_s=100.0)
    result = simulate(ABC, make_policy(config), FixedCost())
    pre = {r.request_id: r.preemptions for r in result.records}
    assert pre == {0: 2, 1: 0, 2: 0}  # A left out at t=1 (for B) and t=3 (for C)


def test_pipeline_keeps_two_disjoint_batches_in_flight():
    # two stages of 0.5 s: A runs 0-1 and 1-2; B starts at 0.5 while A is in flight, runs 0.5-1.5, 1.5-2.5
    for name in ("fcfs", "rtc", "skip-join-mlfq"):
        config = SchedulerConfig(policy=name, max_jobs=1)
        result = simulate(workload((0.0, 4, 2), (0.0, 4, 2)), make_policy(config), FixedCost(1.0, num_stages=2))
        assert sorted(r.jct_s for r in result.records) == pytest.approx([2.0, 2.5])


def test_ttft_and_first_scheduled_recorded():
    config = SchedulerConfig(policy="fcfs", max_jobs=1)
    result = simulate(workload((0.0, 4, 3), (0.2, 4, 1)), make_policy(config), FixedCost())
    a, b = sorted(result.records, key=lambda r: r.request_id)
    assert (a.ttft_s, a.jct_s, a.tpot_s, a.queueing_s) == pytest.approx((1.0, 3.0, 1.0, 0.0))
    assert (b.queueing_s, b.ttft_s, b.jct_s) == pytest.approx((2.8, 3.8, 3.8))


def test_roofline_run_is_deterministic_and_conserves_tokens():
    wl = synthetic(200, rate=1.0, cv=2.0, seed=3)
    cost = roofline("A100-40GB", "gpt3-175b", tp=8, pp=2)
    first = run_policies(wl, cost, SchedulerConfig(), ["skip-join-mlfq", "fcfs"])
    again = run_policies(wl, cost, SchedulerConfig(), ["skip-join-mlfq", "fcfs"])
    assert first["skip-join-mlfq"]["jct_s"] == again["skip-join-mlfq"]["jct_s"]
    for summary in first.values():
        assert summary["num_requests"] == 200
        assert summary["throughput_tps"] * summary["span_s"] == pytest.approx(sum(r.output_len for r in wl.requests))


def test_cli_json_has_a_summary_per_policy(capsys):
    rc = cli.main(["--rate", "1", "--num", "50", "--policies", "fcfs,skip-join-mlfq", "--json", "--tp", "8", "--pp", "2"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["policies"]) == {"fcfs", "skip-join-mlfq"}
    assert out["workload"]["num_requests"] == 50 and out["cost"]["num_gpus"] == 16
    assert out["policies"]["fcfs"]["jct_s"]["mean"] > 0


def test_cli_rejects_bad_input(capsys):
    assert cli.main(["--rate", "1", "--policies", "lottery"]) == 2
    assert "unknown policy" in capsys.readouterr().err
    assert cli.main(["--num", "5"]) == 2
    assert "--rate" in capsys.readouterr().err
    assert cli.main(["--rate", "1", "--input-zipf", "1.1"]) == 2


def test_cli_profile_cost_and_kv_memory(tmp_path, capsys):
    from common.profile import Profile

    profile = Profile(
        prefill_len=(16, 512), prefill_s=(0.01, 0.1), decode_batch=(1, 16), decode_context=(16, 1024),
        decode_s=((0.005, 0.006), (0.008, 0.012)), meta={"model": "tiny"},
    )
    path = tmp_path / "profile.json"
    profile.save(path)
    argv = ["--profile", str(path), "-o", "parallel.num_stages=1", "-o", "cache.num_gpu_blocks=64",
            "--rate", "20", "--num", "60", "--input-zipf", "1.1,16,256", "--output-zipf", "1.1,1,64",
            "--memory", "kv", "--policies", "skip-join-mlfq,fcfs", "--json"]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cost"]["kind"] == "profile" and out["memory"] == "kv"
    for summary in out["policies"].values():
        assert summary["num_requests"] == 60
        assert summary["sim"]["device_blocks_total"] == 64
