"""The scheduler's iteration log, and the stack cost fitted from it."""

from __future__ import annotations

import json

import pytest

from bench.stack_cost import fit_log, pipeline_seconds, read_log
from common.profile import Profile
from services.scheduler.iterlog import IterationLog

PROFILE = Profile.from_dict({
    "version": 1, "model": "tiny",
    "prefill": {"input_len": [16, 1024], "seconds": [0.010, 0.100]},
    "decode": {"batch_size": [1, 16], "context_len": [64, 1024], "seconds": [[0.004, 0.004], [0.008, 0.008]]},
})


def test_a_batch_is_logged_when_it_returns_with_the_jobs_that_ran(tmp_path):
    path = tmp_path / "it.jsonl"
    log = IterationLog(str(path), {"policy": "fcfs", "stages": 2})
    log.sent(7, [1, 2, 3], [16, 1, 1], [0, 40, 50], [], now=1.0)
    log.sent(8, [2, 3], [1, 1], [41, 51], [7, 7], now=1.1)  # carries the tokens batch 7 samples
    log.sent(9, [4], [5], [0], [], now=1.2)
    log.sent(10, [], [], [], [], now=1.3)  # housekeeping: nothing computes
    log.done(7, [1, 3], 0.05, "", now=1.5)  # job 2 was held back
    log.done(9, [4], 0.01, "a stage failed", now=1.55)  # failed batches are not costs
    log.done(8, [2, 3], 0.02, "", now=1.6)
    log.close()
    header, first, second = [json.loads(line) for line in path.read_text().splitlines()]
    assert header == {"header": 1, "policy": "fcfs", "stages": 2}
    assert first == {"b": 7, "sent": 1.0, "ready": 1.0, "done": 1.5, "compute_s": 0.05, "new": [16, 1], "ctx": [0, 50]}
    assert (second["b"], second["sent"], second["ready"], second["done"]) == (8, 1.1, 1.5, 1.6)
    assert log.pending == {}


def test_the_pipeline_time_is_the_lesser_of_the_stay_and_the_gap_to_the_batch_before():
    batches = [{"sent": 0.0, "done": 0.010}, {"sent": 0.001, "done": 0.016}, {"sent": 0.011, "ready": 0.016, "done": 0.030}]
    # first: alone, 10 ms; second: queued behind it, 6 ms after it on the last stage (x 2 stages);
    # third: could start only at 16 ms, 14 ms in the stack
    assert pipeline_seconds(batches, 2) == pytest.approx([0.010, 0.012, 0.014])
    assert pipeline_seconds(batches, 1) == pytest.approx([0.010, 0.006, 0.014])


def _log(tmp_path, added_decode: float, added_prefill: float) -> str:
    """A one-stage run whose batches take the profile's time plus known added costs, back to back."""
    lines, t = [json.dumps({"header": 1, "policy": "fcfs", "stages": 1})], 0.0
    for k in range(60):
        jobs = 1 + k % 3
        if k % 4 == 0:  # one prefill of 512 tokens with the decode jobs
            new, ctx = [512] + [1] * jobs, [0] + [100] * jobs
            seconds = PROFILE.iteration_time([512], [100] * jobs) + added_decode + added_prefill
        else:
            new, ctx = [1] * jobs, [100] * jobs
            seconds = PROFILE.iteration_time([], [100] * jobs) + added_decode
        lines.append(json.dumps({"b": k, "sent": t, "done": t + seconds, "compute_s": seconds, "new": new, "ctx": ctx}))
        t += seconds
    lines.append(json.dumps({"header": 1, "policy": "skip-join-mlfq", "stages": 1}))
    path = tmp_path / "it.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_the_fit_recovers_the_added_time_of_decode_batches_and_of_a_prefill(tmp_path):
    stages, runs = read_log(_log(tmp_path, 0.003, 0.020), "fcfs")
    rows, prefills = fit_log(PROFILE, stages, runs)
    assert stages == 1 and len(runs) == 1
    assert [round(r["jobs_per_iteration"]) for r in rows] == [1, 2, 3]
    assert all(r["added_ms"] == pytest.approx(3.0) for r in rows)
    assert len(prefills) == 1 and prefills[0]["prompt_len"] == 512
    assert prefills[0]["added_ms"] == pytest.approx(20.0)


def test_a_log_without_batches_of_the_policy_is_refused(tmp_path):
    path = _log(tmp_path, 0.001, 0.0)
    with pytest.raises(ValueError, match="no batches"):
        read_log(path, "skip-join-mlfq")
