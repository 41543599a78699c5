"""The scheduler's and the KV manager's stats count live jobs per MLFQ level, status, hold and residency
(for the front door's /metrics)."""

from __future__ import annotations

from common.config import SchedulerConfig
from common.messages import SubmitJob
from services.kvcache.books import KVBooks
from services.kvcache.planner import Planner
from services.scheduler.core import SchedulerCore, StepOutput
from services.scheduler.policies import make_policy

JOB_COUNTS = ("jobs_waiting", "jobs_running", "jobs_preempted", "jobs_held")


def submit(job_id: int) -> SubmitJob:
    return SubmitJob(job_id, [5], 4, 0.0, 0, 1.0, None, [], False)


def test_live_jobs_are_counted_per_level():
    core = SchedulerCore(make_policy(SchedulerConfig(policy="fcfs")), 1, ())
    assert not any(k.startswith("jobs_level_") for k in core.stats())
    for job_id in (1, 2, 3):
        core.submit(submit(job_id), 0.0)
    core.entries[3].job.level = 2
    stats = core.stats()
    assert (stats["jobs_level_0"], stats["jobs_level_2"], "jobs_level_1" in stats) == (2, 1, False)


def test_live_jobs_are_counted_by_status_and_hold():
    core = SchedulerCore(make_policy(SchedulerConfig(policy="fcfs", max_jobs=2)), 1, ())
    counts = lambda: tuple(core.stats()[k] for k in JOB_COUNTS)  # noqa: E731
    assert counts() == (0, 0, 0, 0)
    for job_id in (1, 2, 3):
        core.submit(submit(job_id), 0.0)
    assert counts() == (3, 0, 0, 0)
    step = core.schedule(0.0)
    assert step.job_ids == [1, 2] and counts() == (1, 2, 0, 0)
    core.planned(step.batch_id, [2], [], 0)  # the KV manager holds job 2 back
    assert counts() == (1, 2, 0, 1)
    core.update(StepOutput(step.batch_id, [1], [7], 0.01), 0.1)
    step = core.schedule(0.1)  # job 2 stays held (no memory event) and is left out: preempted
    assert step.job_ids == [1] and counts() == (1, 1, 1, 1)
    core.kv_changed(0, [])  # memory changed: held jobs may be picked again
    assert counts() == (1, 1, 1, 0)
    core.cancel(3, 0.1)
    assert counts() == (0, 1, 1, 0) and core.stats()["jobs_live"] == 2


def test_jobs_with_kv_only_on_the_host_are_counted_as_swapped():
    books = KVBooks(num_device_blocks=8, num_host_blocks=8, block_size=4)
    planner = Planner(books, "proactive", 0, 4)
    swapped = lambda: planner.stats()["jobs_swapped"]  # noqa: E731
    assert books.grow(1, 6) and books.grow(2, 3)
    assert swapped() == 0
    out = books.swap_out(1)
    assert swapped() == 0  # the offload is in flight: the KV is on the device still
    books.ack(out.op_id)
    assert swapped() == 1
    upload = books.swap_in(1)
    assert swapped() == 0  # on its way back
    books.ack(upload.op_id)
    books.ack(books.swap_out(2).op_id)
    assert swapped() == 1
    books.free(2)
    assert swapped() == 0
