"""The scheduler's stats count live jobs per MLFQ level (for the front door's /metrics)."""

from __future__ import annotations

from common.config import SchedulerConfig
from common.messages import SubmitJob
from services.scheduler.core import SchedulerCore
from services.scheduler.policies import make_policy


def test_live_jobs_are_counted_per_level():
    core = SchedulerCore(make_policy(SchedulerConfig(policy="fcfs")), 1, ())
    assert not any(k.startswith("jobs_level_") for k in core.stats())
    for job_id in (1, 2, 3):
        core.submit(SubmitJob(job_id, [5], 4, 0.0, 0, 1.0, None, [], False), 0.0)
    core.entries[3].job.level = 2
    stats = core.stats()
    assert (stats["jobs_level_0"], stats["jobs_level_2"], "jobs_level_1" in stats) == (2, 1, False)
