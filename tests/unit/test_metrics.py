"""Per-request metrics and their summaries on hand-made records."""

from __future__ import annotations

import pytest

from bench.metrics import SLO, RequestRecord, stats, summarize


def rec(i, arrival, scheduled, first, finish, out, pre=0):
    return RequestRecord(i, arrival, scheduled, first, finish, input_len=10, output_len=out, preemptions=pre)


def test_request_metrics():
    r = rec(0, 1.0, 1.5, 2.0, 6.0, out=5, pre=2)
    assert (r.jct_s, r.ttft_s, r.tpot_s, r.normalized_s, r.queueing_s) == pytest.approx((5.0, 1.0, 1.0, 1.0, 0.5))
    assert rec(1, 0.0, 0.0, 1.0, 1.0, out=1).tpot_s == 0.0
    with pytest.raises(ValueError, match="arrival <= first scheduled"):
        rec(2, 2.0, 1.0, 3.0, 4.0, out=2)


def test_stats_percentiles():
    s = stats([1.0, 2.0, 3.0, 4.0, 5.0])
    assert s["mean"] == 3.0 and s["p50"] == 3.0 and s["p99"] == pytest.approx(4.96) and s["max"] == 5.0


def test_summary_throughput_and_goodput():
    records = [rec(0, 0.0, 0.0, 1.0, 3.0, out=3), rec(1, 1.0, 1.0, 4.0, 10.0, out=4, pre=1)]
    s = summarize(records, SLO(ttft_s=2.0))
    assert s["num_requests"] == 2 and s["span_s"] == 10.0
    assert s["jct_s"]["mean"] == pytest.approx(6.0)
    assert s["throughput_rps"] == pytest.approx(0.2) and s["throughput_tps"] == pytest.approx(0.7)
    assert s["slo_attainment"] == 0.5 and s["goodput_rps"] == pytest.approx(0.1) and s["slo"] == {"ttft_s": 2.0}
    assert s["preemptions"]["mean"] == 0.5
    assert summarize([]) == {"num_requests": 0}
