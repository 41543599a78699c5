"""Bounded starts (services/scheduler/policies/starts.py) on hand-worked cases, and the own-share charge."""

from __future__ import annotations

import pytest

from common.config import ConfigError, SchedulerConfig
from services.scheduler.job import Job, JobStatus
from services.scheduler.policies import FCFS, MLFQ, Orca, SkipJoinMLFQ
from services.scheduler.policies.starts import Capacity, OutputLengths
from test_policies import always
from test_policies import run as ran


def jobs_of(prompts, arrival_s=0.0, max_tokens=50, start_id=0):
    return [Job(job_id=start_id + i, arrival_s=arrival_s, prompt_len=p, max_tokens=max_tokens)
            for i, p in enumerate(prompts)]


def finish(policy, job):
    job.status = JobStatus.FINISHED
    policy.remove(job)


def test_a_burst_larger_than_memory_starts_what_the_device_pool_holds():
    # 4 slots; 16-token prompts count 17 tokens = 5 blocks of 4; the pool has 12 blocks: 2 fit.
    policy = MLFQ(SchedulerConfig(max_jobs=4))
    policy.set_limits(1, Capacity(device_blocks=12, host_blocks=0, block_size=4))
    burst = jobs_of([16] * 8)
    for job in burst:
        policy.add(job, 0.0)
    first = policy.schedule(0.0, always)
    assert first == burst[:2]
    ran(policy, first, 0.01, 0.01)
    assert policy.schedule(0.01, always) == burst[:2]  # the rest wait; nobody thrashes
    finish(policy, burst[0])
    assert policy.schedule(0.02, always) == [burst[1], burst[2]]  # a finish makes room for one more


def test_the_bound_follows_the_reported_capacity():
    policy = MLFQ(SchedulerConfig(max_jobs=4))
    burst = jobs_of([16] * 8)
    for job in burst:
        policy.add(job, 0.0)
    policy.set_limits(1, Capacity(device_blocks=12, host_blocks=0, block_size=4))
    assert len(policy.schedule(0.0, always)) == 2
    policy.set_limits(1, Capacity(device_blocks=20, host_blocks=0, block_size=4, headroom_blocks=5))
    assert len(policy.schedule(0.0, always)) == 3  # 15 blocks usable: 3 jobs of 5
    policy.set_limits(2, Capacity(device_blocks=1000, host_blocks=0, block_size=4))
    assert len(policy.schedule(0.0, always)) == 4  # memory no longer binds: the batch limit does
    assert len(policy.started) == 4


def test_without_capacity_starts_stay_within_the_batch_slots():
    policy = SkipJoinMLFQ(SchedulerConfig(max_jobs=2), lambda n: 0.001 * n)
    policy.set_limits(2, None)  # 2 stages: 4 slots
    jobs = jobs_of([4] * 10)
    for job in jobs:
        policy.add(job, 0.0)
    a = policy.schedule(0.0, always)
    b = policy.schedule(0.0, lambda j: j not in a)
    assert a == jobs[:2] and b == jobs[2:4]
    assert policy.schedule(0.0, lambda j: j not in a and j not in b) == []  # both batches in flight


def test_a_new_job_past_the_slots_parks_a_lower_started_job_only_while_memory_holds_it():
    # 1 slot. A runs and is demoted; B (queue 0) outranks it and parks it: 2 started, 1 running.
    config = SchedulerConfig(max_jobs=1, base_quantum_s=0.01, num_levels=4, start_host_fraction=0.5)
    policy = MLFQ(config)
    policy.set_limits(1, Capacity(device_blocks=6, host_blocks=4, block_size=4))  # room 6 + 2 blocks
    a, b, c = jobs_of([8, 8, 8])  # 9 tokens = 3 blocks each
    policy.add(a, 0.0)
    assert policy.schedule(0.0, always) == [a]
    ran(policy, [a], 0.02, 0.02)
    assert a.level == 1
    policy.add(b, 0.02)
    assert policy.schedule(0.02, always) == [b]
    ran(policy, [b], 0.005, 0.025)
    # C outranks A too, but A is already parked for B, and 9 blocks would pass the room of 8.
    policy.add(c, 0.025)
    assert policy.schedule(0.025, always) == [b]
    assert set(policy.started) == {a.job_id, b.job_id}


def test_starvation_promotion_respects_the_bound():
    config = SchedulerConfig(max_jobs=1, base_quantum_s=0.01, num_levels=3, starvation_limit_s=3.0,
                             starvation_check_s=0.1)
    policy = MLFQ(config)
    policy.set_limits(1, Capacity(device_blocks=4, host_blocks=0, block_size=4))  # one 9-token job fits
    hog, late = jobs_of([8, 8])
    policy.add(hog, 0.0)
    policy.add(late, 0.0)
    policy.demote(late)
    policy.demote(late)  # late waits in the last queue until the starvation check promotes it
    now = 0.0
    for _ in range(50):  # 5 s: late waited past the limit and was promoted, yet memory holds only the hog
        batch = policy.schedule(now, always)
        assert batch == [hog]
        now += 0.1
        ran(policy, batch, 0.1, now)
    assert policy.promotions > 0 and late.level == 0 and late.last_run_s is None
    finish(policy, hog)
    assert policy.schedule(now, always) == [late]


def test_learned_lengths_decide_whether_parking_pays():
    light = OutputLengths()
    for _ in range(100):
        light.record(10)
    assert light.mean == 10 and light.expected_remaining(4) == 6
    heavy = OutputLengths()
    for k in range(100):
        heavy.record(1000 if k % 10 == 0 else 1)
    assert heavy.expected_remaining(1) == 999 and heavy.expected_remaining(1000) == 0.0

    def run_with(lengths):
        policy = MLFQ(SchedulerConfig(max_jobs=1, base_quantum_s=0.01, num_levels=4))
        policy.lengths = lengths
        old, new = jobs_of([8, 8])
        policy.add(old, 0.0)
        ran(policy, policy.schedule(0.0, always), 0.05, 0.05)
        old.num_generated = 4
        policy.add(new, 0.05)
        return policy.schedule(0.05, always) == [new]

    assert run_with(heavy)  # a job that ran is expected to run long: the newcomer parks it
    assert not run_with(light)  # 6 tokens left against 10 for a new job: parking would only add waiting


def test_fcfs_is_strict_under_memory_pressure():
    policy = FCFS(SchedulerConfig(max_jobs=4))
    policy.set_limits(1, Capacity(device_blocks=8, host_blocks=100, block_size=4))
    small, big, tiny = jobs_of([8, 24, 2])  # 3, 7 and 1 blocks
    for job in (small, big, tiny):
        policy.add(job, 0.0)
    # big does not fit beside small; tiny would, but it arrived later: it waits behind big
    assert policy.schedule(0.0, always) == [small]
    finish(policy, small)
    assert policy.schedule(0.1, always) == [big, tiny]


def test_orca_reserves_prompt_plus_max_tokens_and_never_preempts():
    policy = Orca(SchedulerConfig(max_jobs=4))
    policy.set_limits(1, Capacity(device_blocks=20, host_blocks=100, block_size=4))
    jobs = jobs_of([10, 10, 10], max_tokens=30)  # 40 tokens reserved = 10 blocks each
    for job in jobs:
        policy.add(job, 0.0)
    assert policy.schedule(0.0, always) == jobs[:2]
    for t in range(1, 6):
        newcomer = jobs_of([1], arrival_s=t, max_tokens=1, start_id=100 + t)[0]
        policy.add(newcomer, float(t))
        batch = policy.schedule(float(t), always)
        assert batch == jobs[:2]  # the reservations are full: nobody else starts, nobody is preempted
        ran(policy, batch, 0.01, float(t))
    finish(policy, jobs[0])
    assert policy.schedule(7.0, always) == jobs[1:3]


def test_a_fixed_bound_replaces_the_rule():
    policy = MLFQ(SchedulerConfig(max_jobs=8, max_started=3))
    policy.set_limits(1, Capacity(device_blocks=2, host_blocks=0, block_size=4))  # memory ignored
    jobs = jobs_of([8] * 6)
    for job in jobs:
        policy.add(job, 0.0)
    assert policy.schedule(0.0, always) == jobs[:3]
    with pytest.raises(ConfigError):
        SchedulerConfig(max_started=-1).validate()


def test_own_share_splits_an_iteration_by_what_each_job_costs_alone():
    policy = MLFQ(SchedulerConfig(max_jobs=4), prefill_time=lambda n: 0.001 * n)
    prefill, decode = jobs_of([99, 5])
    decode.num_computed, decode.num_generated = 5, 1
    for job in (prefill, decode):
        policy.add(job, 0.0)
    batch = policy.schedule(0.0, always)
    assert batch == [prefill, decode]
    policy.update(batch, 0.2, 0.2)
    assert prefill.service_s == pytest.approx(0.2 * 99 / 100)
    assert decode.service_s == pytest.approx(0.2 * 1 / 100)
    whole = MLFQ(SchedulerConfig(max_jobs=4, service_share="iteration"))
    a, b = jobs_of([99, 5])
    whole.add(a, 0.0)
    whole.add(b, 0.0)
    whole.update(whole.schedule(0.0, always), 0.2, 0.2)
    assert a.service_s == b.service_s == 0.2
