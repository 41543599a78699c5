"""The simulator and the scheduler service run one core: the same inputs give the same decisions.

The simulator runs a workload with swapping under memory pressure (holds, offloads, uploads), two
pipeline stages and overlapped scheduling (decode jobs carried into the next batch), and every call it makes into its SchedulerCore is taped. The tape is then replayed
into a core built the way the scheduler process builds it (`build_core`), with every input crossing
the wire as the process receives it (encoded, decoded, translated by the service's `from_wire`) and
every step leaving through `to_wire`. Each step and each job event must be the same.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bench.sim.engine import EOS, Simulator
from bench.sim.kv import kv_memory_factory
from bench.workloads import synthetic
from common import codec
from common.config import CacheConfig, SchedulerConfig
from common.messages import BatchPlanned, BatchResult, KVCapacity, KVChanged, ScheduleBatch, SubmitJob
from services.scheduler.policies import make_policy
from services.scheduler.service import build_core, from_wire, to_wire


class TightCost:
    """Two stages; iteration time grows with the batch; 4 ms per 16-token block copied; 40 blocks of KV."""

    num_stages = 2
    kv_capacity_tokens = 40 * 16

    def iteration_time(self, prefill_lens, decode_contexts):
        return 0.01 + 1e-5 * sum(prefill_lens) + 2e-6 * sum(decode_contexts)

    def prefill_time(self, input_len):
        return 0.01 + 1e-5 * input_len

    def swap_time(self, num_tokens):
        return 0.004 * num_tokens / 16

    def describe(self):
        return {"kind": "tight"}


def tape_of(sim: Simulator) -> list[tuple]:
    """Record every call the simulator makes into its core, with what the core answered."""
    core, tape = sim.core, []

    def taped(name):
        method = getattr(core, name)

        def call(*args, **kwargs):
            out = method(*args, **kwargs)
            tape.append((name, args, kwargs, out))
            return out

        return call

    for name in ("submit", "schedule", "planned", "update", "kv_changed"):
        setattr(core, name, taped(name))
    return tape


def wire(msg):
    return codec.decode(codec.encode(msg))


@pytest.mark.parametrize("policy, swaps", [("skip-join-mlfq", True), ("mlfq", True), ("fcfs", False)])
def test_the_service_core_makes_the_simulators_decisions(policy, swaps):
    scheduler = SchedulerConfig(policy=policy, max_jobs=4, overlap="on")
    cost = TightCost()
    memory = kv_memory_factory(CacheConfig(block_size=16, swap="proactive", headroom_blocks=2), scheduler, cost)()
    workload = synthetic(60, rate=40.0, cv=2.0, input_zipf=(1.1, 8, 200), output_zipf=(1.1, 1, 120), seed=3)
    sim = Simulator(workload, make_policy(scheduler, cost.prefill_time), cost, memory)
    tape = tape_of(sim)
    result = sim.run()
    assert len(result.records) == 60
    if swaps:  # the preemptive policies outgrow the device pool; strict fcfs starts only what fits
        assert result.stats["swaps_out"] > 0 and result.stats["held"] > 0

    core = build_core(scheduler, cost.num_stages, (EOS,), prefill_time=cost.prefill_time)
    capacity = memory.capacity()
    core.set_capacity(wire(KVCapacity(capacity.device_blocks, capacity.host_blocks, capacity.block_size,
                                      capacity.headroom_blocks)))
    steps = events = carried = 0
    for name, args, kwargs, out in tape:
        if name == "submit":
            msg, now = args
            prompt = [7] * kwargs["prompt_len"]  # the process gets token ids; the simulator only a length
            core.submit(wire(dataclasses.replace(msg, prompt_ids=prompt)), now)
        elif name == "schedule":
            got = core.schedule(*args)
            if out is None:
                assert got is None
                continue
            batch = wire(to_wire(got))
            assert isinstance(batch, ScheduleBatch)
            for field in ("batch_id", "job_ids", "num_new_tokens", "context_lens", "freed_job_ids"):
                assert getattr(batch, field) == getattr(out, field), (field, batch.batch_id)
            # The simulator skips the O(jobs) run order while its plan cannot depend on it.
            assert batch.run_order == out.run_order or not out.run_order
            assert sorted(batch.in_flight_job_ids) == sorted(out.in_flight_job_ids)
            assert batch.sampling.step == out.sampling.step
            assert len(batch.input_ids) == sum(batch.num_new_tokens)
            assert batch.carry_from == out.carry_from
            steps += 1
            carried += sum(b >= 0 for b in out.carry_from)
        elif name == "planned":
            batch_id, held, dropped, copies = args
            msg = wire(BatchPlanned(batch_id, held, dropped, 0, copies))
            core.planned(msg.batch_id, msg.held_job_ids, msg.dropped_job_ids, msg.copies_in_flight)
        elif name == "update":
            sim_out, now = args
            msg = wire(BatchResult(sim_out.batch_id, sim_out.job_ids, sim_out.token_ids, sim_out.compute_s, ""))
            got = core.update(from_wire(msg), now)
            assert [(e.job_id, e.token_ids, e.finish_reason) for e in got] == \
                   [(e.job_id, e.token_ids, e.finish_reason) for e in out]
            events += len(got)
        else:
            copies, dropped = args
            msg = wire(KVChanged(0, copies, dropped))
            core.kv_changed(msg.copies_in_flight, msg.dropped_job_ids)
    assert core.idle and steps > 100 and events == sum(r.output_len for r in result.records)
    assert carried > 0  # overlapped scheduling carried decode jobs into the next batch
    assert np.isfinite(core.counters.compute_s)
