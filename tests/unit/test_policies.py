"""Rules of the scheduling policies, checked with job factories and a hand-driven clock."""

from __future__ import annotations


import pytest

from common.config import ConfigError, SchedulerConfig
from services.scheduler.job import Job, JobStatus
from services.scheduler.policies.base import MAX_SKIPPED
from services.scheduler.policies import FCFS, MLFQ, RunToCompletion, SRPTOracle, SkipJoinMLFQ, make_policy


def make_jobs(prompts, arrival_s=0.0, max_tokens=100, outputs=None, start_id=0):
    outputs = outputs or [None] * len(prompts)
    return [
        Job(job_id=start_id + i, arrival_s=arrival_s, prompt_len=p, max_tokens=max_tokens, oracle_output_len=o)
        for i, (p, o) in enumerate(zip(prompts, outputs))
    ]


def always(job):
    return True


def run(policy, batch, seconds, now):
    """Pretend the batch ran one iteration: one token each, KV computed, then account it."""
    for job in batch:
        job.num_computed = job.context_len
        job.num_generated += 1
    policy.update(batch, seconds, now)


def linear_prefill(seconds_per_token):
    return lambda n: n * seconds_per_token


def test_job_token_accounting_and_status_order():
    job = make_jobs([10])[0]
    assert job.num_new_tokens == 10 and job.is_prefill and job.context_len == 10
    job.num_computed, job.num_generated = 10, 1
    assert job.num_new_tokens == 1 and not job.is_prefill and job.context_len == 11
    job.num_computed = 0  # KV dropped: recompute prompt and output
    assert job.num_new_tokens == 11 and job.is_prefill
    assert not job.is_finished
    job.status = JobStatus.CANCELLED
    assert job.is_finished and JobStatus.PREEMPTED < JobStatus.FINISHED
    with pytest.raises(ValueError, match="prompt_len"):
        Job(job_id=1, arrival_s=0.0, prompt_len=0, max_tokens=4)


@pytest.mark.parametrize(
    ("prompt_len", "level"),
    # 1 ms per token; quanta 10, 20, 40, 80, 160, 320 ms
    [(1, 0), (10, 0), (11, 1), (20, 1), (21, 2), (80, 3), (150, 4), (321, 5), (5000, 5)],
)
def test_skip_join_picks_highest_queue_whose_quantum_covers_prefill(prompt_len, level):
    policy = SkipJoinMLFQ(SchedulerConfig(num_levels=6), linear_prefill(0.001))
    job = make_jobs([prompt_len])[0]
    policy.add(job, now=0.0)
    assert job.level == level
    assert policy.queue_sizes()[level] == 1


def test_skip_join_without_profile_and_classic_mlfq_join_top():
    for policy in (SkipJoinMLFQ(SchedulerConfig()), MLFQ(SchedulerConfig(), linear_prefill(0.001))):
        job = make_jobs([1000])[0]
        policy.add(job, 0.0)
        assert job.level == 0


def test_demotion_exactly_when_attained_service_passes_quantum():
    policy = MLFQ(SchedulerConfig(base_quantum_s=0.010, quantum_ratio=2.0))
    job = make_jobs([4])[0]
    policy.add(job, 0.0)
    run(policy, [job], 0.004, 0.004)
    run(policy, [job], 0.006, 0.010)  # attained 10 ms == quantum: stays
    assert job.level == 0
    run(policy, [job], 0.001, 0.011)  # 11 ms > 10 ms: demoted, attained reset
    assert job.level == 1 and job.attained_s == 0.0
    for k in range(4):  # 4 x 5 ms = 20 ms == quantum of level 1
        run(policy, [job], 0.005, 0.011 + 0.005 * (k + 1))
    assert job.level == 1
    run(policy, [job], 0.005, 0.04)
    assert job.level == 2 and policy.demotions == 2


def test_demote_to_front_or_back():
    for where, expected in (("front", [1, 0]), ("back", [0, 1])):
        policy = MLFQ(SchedulerConfig(demote_to=where, max_jobs=1))
        a, b = make_jobs([4, 4])
        policy.add(a, 0.0)
        policy.add(b, 0.0)
        run(policy, [a], 0.05, 0.05)  # a -> level 1
        run(policy, [b], 0.05, 0.10)  # b -> level 1, front or back of a
        assert [j.job_id for j in policy.levels[1].values()] == expected


def test_starvation_measured_from_arrival_for_a_job_that_never_ran():
    config = SchedulerConfig(starvation_limit_s=3.0, starvation_check_s=0.1, max_jobs=1, num_levels=4)
    policy = SkipJoinMLFQ(config, linear_prefill(0.001))
    hog = make_jobs([5])[0]  # level 0, keeps running
    late = make_jobs([100], arrival_s=10.0, start_id=1)[0]  # level 3 (100 ms > 40 ms)
    policy.add(hog, 0.0)
    policy.add(late, 10.0)
    assert late.level == 3
    # 12.9 s after time 0 but only 2.9 s after its arrival: not starved (the official code's flaw)
    assert policy.schedule(12.9, always) == [hog]
    assert late.level == 3 and policy.promotions == 0
    # hog is demoted meanwhile but keeps running as the only job above level 3
    run(policy, [hog], 0.001, 12.9)
    assert policy.schedule(13.0, always) == [hog]
    assert late.level == 0 and policy.promotions == 1  # 3.0 s after arrival
    assert [j.job_id for j in policy.levels[0].values()][-1] == late.job_id


def test_starvation_measured_from_last_run():
    config = SchedulerConfig(starvation_limit_s=3.0, starvation_check_s=0.1, max_jobs=1)
    policy = MLFQ(config)
    a, b = make_jobs([4, 4])
    policy.add(a, 0.0)
    policy.add(b, 0.0)
    run(policy, [a], 0.1, 0.1)  # a demoted to level 1, last ran at 0.1
    for t in (0.2, 0.3):
        assert policy.schedule(t, always) == [b]
        run(policy, [b], 0.1, t)
    b_level = b.level
    policy.schedule(3.09, always)
    assert a.level == 1  # waited 2.99 s since its last run
    policy.schedule(3.2, always)
    assert a.level == 0 and b.level == b_level


def test_batch_limits_jobs_and_prefill_tokens():
    policy = FCFS(SchedulerConfig(max_jobs=3, max_prefill_tokens=100))
    policy.set_limits(2, None)  # two stages: a second batch may start jobs too
    jobs = make_jobs([60, 50, 30, 10, 5])
    for job in jobs:
        policy.add(job, 0.0)
    # 60 fits, 50 would make 110 and is passed over, 30 fits (90), 10 fits (100): 3 jobs
    assert [j.job_id for j in policy.schedule(0.0, always)] == [0, 2, 3]
    # decode jobs do not count against the prompt budget
    run(policy, jobs[:1], 0.01, 0.01)
    jobs[0].num_generated = 1
    assert [j.job_id for j in policy.schedule(0.01, always)] == [0, 1, 2]


def test_oversized_prompt_is_the_only_prefill_of_its_batch():
    policy = FCFS(SchedulerConfig(max_jobs=4, max_prefill_tokens=100))
    running, big, small, later = make_jobs([20, 500, 10, 30])
    running.num_computed, running.num_generated = 20, 1  # decoding
    for job in (running, big, small, later):
        policy.add(job, 0.0)
    # the decode job rides along; the long prompt takes the whole budget, so no other prefill joins
    assert policy.schedule(0.0, always) == [running, big]
    # once another prefill has been taken, the long prompt is passed over
    assert policy.schedule(0.0, lambda j: j is not running and j is not big) == [small, later]
    assert policy.schedule(0.0, lambda j: j is not running) == [big]


def test_can_run_false_jobs_are_skipped():
    policy = MLFQ(SchedulerConfig(max_jobs=2))
    jobs = make_jobs([4, 4, 4])
    for job in jobs:
        policy.add(job, 0.0)
    assert policy.schedule(0.0, lambda j: j.job_id != 0) == jobs[1:]


def test_fcfs_never_preempts_a_running_job_for_a_newer_one():
    policy = FCFS(SchedulerConfig(max_jobs=2))
    old = make_jobs([4, 4])
    for job in old:
        policy.add(job, 0.0)
    assert policy.schedule(0.0, always) == old
    run(policy, old, 0.01, 0.01)
    for t in range(1, 20):
        newcomer = make_jobs([1], arrival_s=t * 0.01, start_id=100 + t)[0]
        policy.add(newcomer, t * 0.01)
        batch = policy.schedule(t * 0.01, always)
        assert batch == old
        run(policy, batch, 0.01, (t + 1) * 0.01)
    policy.remove(old[0])
    assert [j.job_id for j in policy.schedule(1.0, always)] == [1, 101]


def test_rtc_admits_no_new_job_until_its_batch_drains():
    policy = RunToCompletion(SchedulerConfig(max_jobs=2))
    a, b, c = make_jobs([4, 4, 4])
    for job in (a, b, c):
        policy.add(job, 0.0)
    assert policy.schedule(0.0, always) == [a, b]
    policy.remove(a)  # a finished; c must still wait for b
    assert policy.schedule(0.1, always) == [b]
    policy.remove(b)
    assert policy.schedule(0.2, always) == [c]


def test_rtc_forms_a_second_batch_only_while_the_first_is_in_flight():
    policy = RunToCompletion(SchedulerConfig(max_jobs=2))
    policy.set_limits(2, None)
    jobs = make_jobs([4, 4, 4, 4, 4])
    for job in jobs:
        policy.add(job, 0.0)
    first = policy.schedule(0.0, always)
    second = policy.schedule(0.0, lambda j: j not in first)
    assert first == jobs[:2] and second == jobs[2:4]
    assert policy.schedule(0.0, always) == first


def test_srpt_oracle_order_by_remaining_output():
    policy = SRPTOracle(SchedulerConfig(max_jobs=2))
    jobs = make_jobs([4, 4, 4, 4], outputs=[30, 5, 20, None], max_tokens=40)
    for job in jobs:
        policy.add(job, 0.0)
    assert [j.job_id for j in policy.run_order(0.0)] == [1, 2, 0, 3]  # None falls back to max_tokens=40
    assert policy.schedule(0.0, always) == [jobs[1], jobs[2]]
    for _ in range(20):  # jobs 1, 2 run; 1 finishes after 5, then 2 and 0 run; 2 finishes after 20
        batch = policy.schedule(0.0, always)
        run(policy, batch, 0.01, 0.0)
        for job in batch:
            if job.num_generated == job.oracle_output_len:
                job.status = JobStatus.FINISHED
                policy.remove(job)
    assert [j.job_id for j in policy.run_order(0.0)] == [0, 3]
    assert jobs[2].is_finished and jobs[0].num_generated == 15


def test_mlfq_run_order_hand_worked():
    # max_jobs 2, mean iteration 1.0 s, starvation limit 3 s
    config = SchedulerConfig(max_jobs=2, starvation_limit_s=3.0, base_quantum_s=0.5, num_levels=3)
    policy = MLFQ(config)
    a, b, c, d, e = make_jobs([4, 4, 4, 4, 4])
    for job in (a, b, c, d, e):
        policy.add(job, 0.0)
    run(policy, [a], 1.0, 1.0)  # a -> level 1 (1.0 > 0.5), front; last ran at 1.0
    run(policy, [b], 1.0, 2.0)  # b -> level 1 front: level 1 = [b, a]
    assert policy.iteration_s == 1.0
    # walk: c, d, e (level 0), b, a (level 1); rank k runs at now + (k // 2) * 1.0, now = 2.0:
    # c 2, d 2, e 3, b 3, a 4; starvation: a at 1 + 3 = 4, b at 2 + 3 = 5 -> no change but ties
    assert [j.job_id for j in policy.run_order(2.0)] == [2, 3, 4, 1, 0]
    # two more jobs at level 0 push a to rank 6 (t = 2 + 3 = 5) and b to rank 5 (t = 4):
    # a's promotion at 4.0 ties b's walk estimate; walk estimates come first on ties
    f, g = make_jobs([4, 4], start_id=5)
    policy.add(f, 2.0)
    policy.add(g, 2.0)
    assert [j.job_id for j in policy.run_order(2.0)] == [2, 3, 4, 5, 6, 1, 0]
    # at now = 3.5 the walk gives c, d 3.5; e, f 4.5; g, b 5.5; a 6.5, but a's promotion is due
    # at 4.0 and b's at 5.0, so both move ahead of the jobs the walk puts later
    assert [j.job_id for j in policy.run_order(3.5)] == [2, 3, 0, 4, 5, 1, 6]


def test_make_policy_and_errors():
    for name in ("skip-join-mlfq", "mlfq", "fcfs", "rtc", "srpt-oracle"):
        assert make_policy(SchedulerConfig(policy=name)).name == name
    with pytest.raises(ConfigError):
        make_policy(SchedulerConfig(policy="lottery"))
    policy = make_policy(SchedulerConfig())
    job = make_jobs([4])[0]
    policy.add(job, 0.0)
    with pytest.raises(ValueError, match="already held"):
        policy.add(job, 0.0)
    policy.remove(job)
    with pytest.raises(KeyError):
        policy.remove(job)
    job.status = JobStatus.FINISHED
    with pytest.raises(ValueError, match="FINISHED"):
        policy.add(job, 0.0)


@pytest.mark.parametrize("name", ["skip-join-mlfq", "mlfq", "fcfs", "srpt-oracle"])
def test_a_decision_over_10000_queued_jobs_looks_at_a_bounded_number(name):
    """The work of one decision is bounded by the batch, not the queue (its time is in bench/sim/speed.py)."""
    policy = make_policy(SchedulerConfig(policy=name), linear_prefill(0.0001))
    jobs = [Job(job_id=i, arrival_s=i * 1e-3, prompt_len=1 + i % 700, max_tokens=50, oracle_output_len=1 + i % 50)
            for i in range(10_000)]
    for job in jobs:
        policy.add(job, job.arrival_s)
    now = 10.0
    for _ in range(20):
        looked = []

        def some_busy(job: Job) -> bool:  # 1 job in 4 is in a batch in flight or held back
            looked.append(job.job_id)
            return job.job_id % 4 != 0

        batch = policy.schedule(now, some_busy)
        assert 0 < len(batch) <= policy.config.max_jobs
        assert len(looked) <= MAX_SKIPPED + policy.config.max_jobs + 1
        now += 0.02
        run(policy, batch, 0.02, now)


def test_starvation_promotions_are_capped_per_check_longest_wait_first():
    config = SchedulerConfig(max_jobs=2, starvation_limit_s=3.0, num_levels=3)
    policy = MLFQ(config)
    jobs = make_jobs([4] * 20)
    for k, job in enumerate(jobs):
        job.arrival_s = k * 0.01
        policy.add(job, job.arrival_s)
    for job in jobs:  # put everyone at level 2 without running anyone
        policy.demote(job)
        policy.demote(job)
    policy.schedule(10.0, always)
    assert policy.promotions == 8  # 4 x max_jobs
    assert list(policy.levels[0]) == list(range(8))
    policy.schedule(10.0, always)  # the backlog continues at the next call, whatever the period
    assert policy.promotions == 16
