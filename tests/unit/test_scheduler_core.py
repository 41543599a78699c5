"""The scheduler's pure core driven with a fake pipeline: batches, tokens, finishing, cancel, frees."""

from __future__ import annotations

import numpy as np

from common.config import SchedulerConfig
from common.messages import SubmitJob
from services.scheduler.core import SchedulerCore, StepOutput
from services.scheduler.policies import make_policy

EOS = 257


def submit(job_id: int, prompt: list[int], max_tokens: int, stop=(), ignore_eos=False) -> SubmitJob:
    return SubmitJob(job_id, prompt, max_tokens, 0.0, 0, 1.0, None, list(stop), ignore_eos)


def make_core(policy: str = "fcfs", stages: int = 1, **knobs) -> SchedulerCore:
    return SchedulerCore(make_policy(SchedulerConfig(policy=policy, **knobs)), stages, (EOS,))


def result(batch, tokens: list[int], compute_s: float = 0.01) -> StepOutput:
    return StepOutput(batch.batch_id, list(batch.job_ids), tokens, compute_s, "")


def test_prefill_then_decode_inputs_and_finish_on_length():
    core = make_core()
    core.submit(submit(1, [10, 11, 12], max_tokens=2), now=0.0)
    b0 = core.schedule(0.0)
    assert (b0.job_ids, b0.num_new_tokens, b0.context_lens) == ([1], [3], [0])
    assert b0.input_ids.tolist() == [10, 11, 12] and b0.sampling.step == [0]
    assert core.schedule(0.0) is None  # one stage: one batch in flight
    (ev,) = core.update(result(b0, [42]), 0.1)
    assert (ev.token_ids, ev.finish_reason) == ([42], "")
    b1 = core.schedule(0.1)
    assert (b1.num_new_tokens, b1.context_lens, b1.input_ids.tolist(), b1.sampling.step) == ([1], [3], [42], [1])
    (ev,) = core.update(result(b1, [43]), 0.2)
    assert (ev.token_ids, ev.finish_reason) == ([43], "length")
    housekeeping = core.schedule(0.2)  # the finished job's KV is freed with the next message
    assert housekeeping.job_ids == [] and housekeeping.freed_job_ids == [1]
    core.update(result(housekeeping, []), 0.3)
    assert core.idle and core.schedule(0.3) is None


def test_stop_token_and_eos_end_the_job_unless_ignored():
    core = make_core()
    core.submit(submit(1, [1], 10, stop=[99]), 0.0)
    core.submit(submit(2, [1], 10), 0.0)
    core.submit(submit(3, [1], 10, ignore_eos=True), 0.0)
    b = core.schedule(0.0)
    events = core.update(result(b, [99, EOS, EOS]), 0.1)
    assert [e.finish_reason for e in events] == ["stop", "stop", ""]


def test_pipeline_keeps_one_disjoint_batch_per_stage():
    core = make_core(stages=2, max_jobs=1)
    for j in range(3):
        core.submit(submit(j, [1, 2], 5), 0.0)
    b0, b1 = core.schedule(0.0), core.schedule(0.0)
    assert core.schedule(0.0) is None
    assert set(b0.job_ids).isdisjoint(b1.job_ids)
    assert b1.in_flight_job_ids == b0.job_ids


def test_cancel_in_flight_frees_only_after_the_batch_returns():
    core = make_core()
    core.submit(submit(1, [1, 2, 3], 50), 0.0)
    b = core.schedule(0.0)
    (ev,) = core.cancel(1, 0.05)
    assert ev.finish_reason == "cancelled"
    assert core.schedule(0.05) is None  # batch still in flight: nothing to free yet
    assert core.update(result(b, [7]), 0.1) == []  # the late token of a cancelled job is dropped
    free = core.schedule(0.1)
    assert free.freed_job_ids == [1] and free.job_ids == []
    assert core.cancel(1, 0.2) == []  # a second cancel is a no-op


def test_held_jobs_wait_for_memory_and_dropped_jobs_recompute():
    core = make_core(max_jobs=2)
    core.submit(submit(1, [1, 2, 3], 9), 0.0)
    core.submit(submit(2, [4, 5], 9), 0.0)
    b = core.schedule(0.0)
    core.planned(b.batch_id, [2], [], 1)
    core.update(StepOutput(b.batch_id, [1], [8], 0.01, ""), 0.1)
    b2 = core.schedule(0.1)
    assert b2.job_ids == [1]  # job 2 waits: no memory event yet
    core.update(result(b2, [9]), 0.2)
    core.kv_changed(0, [])
    b3 = core.schedule(0.2)
    assert 2 in b3.job_ids
    # job 1's KV is dropped: its next run recomputes prompt + both outputs
    core.planned(b3.batch_id, [1], [1], 0)
    core.update(StepOutput(b3.batch_id, [2], [3], 0.01, ""), 0.3)
    core.kv_changed(0, [])
    b4 = core.schedule(0.3)
    i = b4.job_ids.index(1)
    assert (b4.num_new_tokens[i], b4.context_lens[i]) == (5, 0)
    start = sum(b4.num_new_tokens[:i])
    assert b4.input_ids[start : start + 5].tolist() == [1, 2, 3, 8, 9]


def test_failed_batch_fails_its_jobs_only():
    core = make_core(stages=2, max_jobs=1)
    core.submit(submit(1, [1], 5), 0.0)
    core.submit(submit(2, [1], 5), 0.0)
    b0, b1 = core.schedule(0.0), core.schedule(0.0)
    (ev,) = core.update(StepOutput(b0.batch_id, [], [], 0.0, "stage 0: boom"), 0.1)
    assert (ev.job_id, ev.finish_reason, ev.error_code) == (b0.job_ids[0], "error", "internal")
    (ok,) = core.update(result(b1, [4]), 0.1)
    assert ok.finish_reason == ""


def test_fail_all_ends_every_job_and_forgets_the_pipeline():
    core = make_core(stages=2)
    for j in range(4):
        core.submit(submit(j, [1], 5), 0.0)
    core.schedule(0.0)
    events = core.fail_all("internal", "worker 1 exited", 0.1)
    assert sorted(e.job_id for e in events) == [0, 1, 2, 3]
    assert all(e.error_code == "internal" for e in events)
    assert not core.in_flight and not core.entries


def test_preemption_is_counted_when_a_running_job_is_left_out():
    core = make_core(policy="mlfq", max_jobs=1, base_quantum_s=0.001)
    core.submit(submit(1, [1], 50), 0.0)
    b = core.schedule(0.0)
    core.update(result(b, [5], compute_s=0.01), 0.01)  # job 1 used more than its quantum: demoted
    core.submit(submit(2, [1], 50), 0.02)
    b = core.schedule(0.02)
    assert b.job_ids == [2]
    assert core.entries[1].job.preemptions == 1 and core.stats()["preemptions"] == 1


def test_input_ids_are_int64_arrays():
    core = make_core()
    core.submit(submit(1, [3, 4], 1), 0.0)
    assert core.schedule(0.0).input_ids.dtype == np.int64


def test_restart_loses_batches_in_flight_and_recomputes_dropped_jobs():
    core = make_core(stages=2, max_jobs=1)
    core.submit(submit(1, [1, 2], 9), 0.0)
    core.submit(submit(2, [3], 9), 0.0)
    b0 = core.schedule(0.0)
    core.update(result(b0, [5]), 0.1)
    b1, b2 = core.schedule(0.1), core.schedule(0.1)
    assert b1 is not None and b2 is not None and core.schedule(0.1) is None
    core.restart_pipeline()
    assert core.update(result(b1, [6]), 0.2) == []  # a lost batch's late result is ignored
    core.kv_changed(0, [1])  # job 1's KV was on the lost device pool
    batches = [core.schedule(0.2), core.schedule(0.2)]
    runs = {j: (b.num_new_tokens[i], b.context_lens[i]) for b in batches for i, j in enumerate(b.job_ids)}
    assert runs == {1: (3, 0), 2: (1, 0)}


def test_held_jobs_retry_when_nothing_runs_and_no_memory_event_is_coming():
    core = make_core(max_jobs=1)
    core.submit(submit(1, [1, 2], 5), 0.0)
    b = core.schedule(0.0)
    core.planned(b.batch_id, [1], [], 0)  # held back, no copy pending
    assert core.blocked == {1}
    core.update(StepOutput(b.batch_id, [], [], 0.0, ""), 0.1)  # the iteration ran nothing
    retry = core.schedule(0.1)
    assert retry is not None and retry.job_ids == [1]


def test_a_long_run_of_held_jobs_cannot_hide_the_runnable_ones_forever():
    core = make_core(max_jobs=4)
    for j in range(600):
        core.submit(submit(j, [1], 5), 0.0)
    core.blocked = set(range(520))  # held back by the KV manager, ahead of every runnable job in FCFS order
    b = core.schedule(0.0)
    assert b is not None and len(b.job_ids) == 4


def test_the_kv_managers_capacity_bounds_how_many_jobs_start():
    from common.messages import KVCapacity

    core = make_core("skip-join-mlfq", stages=2, max_jobs=4)
    assert core.policy.slots == 8 and core.policy.capacity is None
    # 4-token blocks, 10 usable: a 7-token prompt counts 8 tokens = 2 blocks, so 5 jobs fit
    core.set_capacity(KVCapacity(device_blocks=12, host_blocks=0, block_size=4, headroom_blocks=2))
    for job_id in range(10):
        core.submit(submit(job_id, [1] * 7, max_tokens=3), now=0.0)
    first, second = core.schedule(0.0), core.schedule(0.0)
    assert first.job_ids == [0, 1, 2, 3] and second.job_ids == [4]
    assert sorted(core.policy.started) == [0, 1, 2, 3, 4]


def test_a_job_whose_sampling_failed_ends_alone():
    core = make_core(max_jobs=4)
    for job_id in (1, 2):
        core.submit(submit(job_id, [5, 6], max_tokens=3), now=0.0)
    batch = core.schedule(0.0)
    assert batch.job_ids == [1, 2]
    msg = StepOutput(batch.batch_id, [1, 2], [-1, 42], 0.01, "", [1], "sampling failed: bad distribution")
    events = {e.job_id: e for e in core.update(msg, 0.1)}
    assert (events[1].finish_reason, events[1].error_code) == ("error", "internal")
    assert "bad distribution" in events[1].error_message
    assert (events[2].token_ids, events[2].finish_reason) == ([42], "")
    assert core.schedule(0.1).freed_job_ids == [1]  # its KV goes back to the pool


def test_a_second_submit_of_a_live_job_id_is_dropped_and_never_ends_the_live_job():
    core = make_core()
    core.submit(submit(1, [5, 6], max_tokens=2), now=0.0)
    assert core.submit(submit(1, [9, 9, 9], max_tokens=50), now=0.1) is None  # forged or stale: no event at all
    batch = core.schedule(0.1)
    assert batch.job_ids == [1] and batch.input_ids.tolist() == [5, 6]  # the live job is untouched
    (event,) = core.update(result(batch, [42]), 0.2)
    assert (event.job_id, event.token_ids, event.finish_reason) == (1, [42], "")
    assert core.stats()["submits_rejected"] == 1


def overlapped(stages: int = 1, **knobs) -> SchedulerCore:
    return SchedulerCore(make_policy(SchedulerConfig(policy="fcfs", **knobs)), stages, (EOS,), overlap=True)


def test_overlap_carries_a_decode_job_into_the_next_batch_before_its_token_is_back():
    core = overlapped()
    core.submit(submit(1, [10, 11, 12], max_tokens=4), 0.0)
    prefill = core.schedule(0.0)
    assert core.schedule(0.0) is None  # a job in prefill is not carried: its next input is not a decode
    core.update(result(prefill, [42]), 0.1)
    b1 = core.schedule(0.1)
    b2 = core.schedule(0.1)  # one stage, one more batch in flight: b1's job carried
    assert (b1.context_lens, b1.sampling.step, b1.carry_from) == ([3], [1], [])
    assert (b2.job_ids, b2.num_new_tokens, b2.context_lens, b2.sampling.step) == ([1], [1], [4], [2])
    assert b2.carry_from == [b1.batch_id] and b2.input_ids.tolist() == [0]  # stage 0 fills the token in
    assert core.schedule(0.1) is None  # at most one carried batch per job
    (e1,) = core.update(result(b1, [43]), 0.2)
    (e2,) = core.update(result(b2, [44]), 0.3)
    assert (e1.token_ids, e2.token_ids) == ([43], [44])
    b3 = core.schedule(0.3)
    assert (b3.context_lens, b3.input_ids.tolist(), b3.sampling.step, b3.carry_from) == ([5], [44], [3], [])
    # b3 makes the job's 4th and last token: it is not carried past it
    assert core.schedule(0.3) is None
    (e3,) = core.update(result(b3, [45]), 0.4)
    assert e3.finish_reason == "length" and core.stats()["jobs_carried"] == 1


def test_a_stop_token_ends_a_carried_job_one_batch_late_and_its_extra_token_is_never_emitted():
    core = overlapped()
    core.submit(submit(1, [5], max_tokens=50), 0.0)
    core.update(result(core.schedule(0.0), [6]), 0.1)
    b1, b2 = core.schedule(0.1), core.schedule(0.1)
    assert b2.carry_from == [b1.batch_id]
    (stop,) = core.update(result(b1, [EOS]), 0.2)
    assert stop.finish_reason == "stop"
    housekeeping = core.schedule(0.2)
    assert housekeeping is None or housekeeping.freed_job_ids == []  # b2 still holds the job's KV
    assert core.update(result(b2, [7]), 0.3) == []  # the extra token is dropped
    assert core.schedule(0.3).freed_job_ids == [1]


def test_a_carried_job_held_back_by_the_kv_manager_is_carried_again_later():
    core = overlapped()
    core.submit(submit(1, [5], max_tokens=50), 0.0)
    core.update(result(core.schedule(0.0), [6]), 0.1)
    b1, b2 = core.schedule(0.1), core.schedule(0.1)
    core.planned(b2.batch_id, [1], [], 0)  # no room for its next token
    core.update(result(b1, [8]), 0.2)
    core.kv_changed(0, [])
    b3 = core.schedule(0.2)
    assert (b3.job_ids, b3.context_lens, b3.input_ids.tolist(), b3.carry_from) == ([1], [2], [8], [])
    core.update(result(b2, []), 0.2)


def test_a_cancelled_carried_job_is_freed_once_both_its_batches_are_back():
    core = overlapped(stages=2)
    core.submit(submit(1, [5], max_tokens=50), 0.0)
    core.update(result(core.schedule(0.0), [6]), 0.1)
    b1 = core.schedule(0.1)
    core.submit(submit(2, [9], max_tokens=50), 0.1)
    b2, b3 = core.schedule(0.1), core.schedule(0.1)  # a batch per stage, then job 1 carried from b1
    assert (b2.job_ids, b3.job_ids, b3.carry_from) == ([2], [1], [b1.batch_id])
    core.cancel(1, 0.15)
    assert core.update(result(b1, [7]), 0.2) == []
    assert core.to_free == []
    core.update(result(b3, [8]), 0.3)
    assert core.to_free == [1]


def test_with_two_stages_a_job_is_carried_only_once_every_stage_has_a_batch():
    core = overlapped(stages=2)
    core.submit(submit(1, [5], max_tokens=50), 0.0)
    core.update(result(core.schedule(0.0), [6]), 0.1)
    b1 = core.schedule(0.1)
    # one batch in flight, stage 0 free: carrying job 1 would make stage 0 wait for b1 to cross both
    # stages, so nothing runs until b1 is back (or another job comes)
    assert core.schedule(0.1) is None
    core.update(result(b1, [7]), 0.2)
    assert core.schedule(0.2).carry_from == []


def test_a_job_cancelled_inside_a_batch_that_fails_still_frees_its_kv():
    core = make_core()
    core.submit(submit(1, [5, 6], max_tokens=8), 0.0)
    b = core.schedule(0.0)
    core.cancel(1, 0.05)
    assert core.update(StepOutput(b.batch_id, [], [], 0.0, "stage 1: boom"), 0.1) == []  # ended already
    assert core.schedule(0.1).freed_job_ids == [1]
