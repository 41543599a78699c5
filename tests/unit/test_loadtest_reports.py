"""Load-test reports: the real-vs-simulator gap and the markdown tables, on hand-made result files."""

from __future__ import annotations

import dataclasses

import pytest

from bench.loadtest.driver import Outcome
from bench.loadtest.simgap import gaps
from bench.loadtest.tables import markdown


def record(index, arrival, finish, tokens=4, warmup=False):
    return dataclasses.asdict(Outcome(index, arrival, arrival, arrival + 0.1, finish, 8, tokens, tokens, warmup))


WORKLOAD = {"num_requests": 2, "input_mean": 8.0, "output_mean": 4.0, "span_s": 1.0}


def loadtest(jcts_by_policy):
    runs = []
    for policy, (a, b) in jcts_by_policy.items():
        runs.append({"policy": policy, "rate": 2.0, "workload": WORKLOAD,
                     "records": [record(0, 0.0, a, warmup=True), record(1, 1.0, 1.0 + b)]})
    return {"runs": runs}


def sim(means_p99):
    return {"workload": WORKLOAD, "policies": {p: {"jct_s": {"mean": m, "p99": q}} for p, (m, q) in means_p99.items()}}


def test_gap_counts_warmup_requests_like_the_simulator():
    g = gaps(loadtest({"fcfs": (2.0, 4.0), "rtc": (1.0, 1.0)}), sim({"fcfs": (3.3, 4.0)}), rate=2.0)
    assert set(g) == {"fcfs"}  # rtc was not simulated
    assert g["fcfs"]["real_jct_mean"] == pytest.approx(3.0)  # (2 + 4) / 2: the warm-up request counts
    assert g["fcfs"]["gap_mean"] == pytest.approx(0.1)
    assert g["fcfs"]["real_jct_p99"] == pytest.approx(2.0 + 0.99 * 2.0)


def test_gap_refuses_different_workloads_and_missing_rates():
    other = sim({"fcfs": (1.0, 1.0)})
    other["workload"] = {**WORKLOAD, "output_mean": 5.0}
    with pytest.raises(ValueError, match="different workloads: output_mean"):
        gaps(loadtest({"fcfs": (1.0, 1.0)}), other, rate=2.0)
    with pytest.raises(ValueError, match="no run at rate 3.0"):
        gaps(loadtest({"fcfs": (1.0, 1.0)}), sim({"fcfs": (1.0, 1.0)}), rate=3.0)


def test_markdown_table_has_a_row_per_policy_with_ratios():
    from bench.loadtest.report import summarize_outcomes

    def run(policy, jct):
        outcomes = [Outcome(0, 0.0, 0.0, 0.1, jct, 8, 4, 4, False)]
        return {"policy": policy, "rate": 0.5, "summary": summarize_outcomes(outcomes)}

    result = {"runs": [run("skip-join-mlfq", 1.0), run("fcfs", 3.0)],
              "ratios": {"0.5": {"skip-join-mlfq": {"jct_s.mean": 3.0, "jct_s.p99": 3.0},
                                 "fcfs": {"jct_s.mean": 1.0, "jct_s.p99": 1.0}}}}
    text = markdown(result, saturation_rps=1.0)
    assert "**0.500 req/s (50% of saturation)**" in text
    assert "| skip-join-mlfq | 1.00 |" in text and text.count("| fcfs | 3.00 |") == 1
    assert "| 3.00 | 3.00 |" in text
