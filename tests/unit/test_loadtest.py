"""Load-test driver pieces: the arrival schedule follows the asked rate and CV, metrics on hand-made records."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench import workloads
from bench.loadtest.driver import Outcome
from bench.loadtest.plan import WorkloadSpec, make_plan, parse_rates, parse_slo
from bench.loadtest.plots import plot_jct_cdf, plot_latency_vs_rate
from bench.loadtest.report import format_table, jct_values, ratios, saturation, summarize_outcomes
from bench.metrics import SLO


def gaps_of(rate: float, cv: float, n: int = 10000, seed: int = 7) -> np.ndarray:
    spec = WorkloadSpec(num=n, rate=rate, cv=cv, input_zipf=(1.1, 1, 8), output_zipf=(1.1, 1, 8), seed=seed)
    return np.diff([s.at_s for s in make_plan(spec.build(), seed=seed)])


def ks_gamma(gaps: np.ndarray, rate: float, cv: float) -> float:
    """sqrt(n) * Kolmogorov-Smirnov distance between the gaps and Gamma(mean 1/rate, CV cv)."""
    shape = 1.0 / cv**2
    x = np.sort(gaps)
    cdf = torch.special.gammainc(torch.tensor(shape, dtype=torch.float64), torch.tensor(x * shape * rate)).numpy()
    n = len(x)
    d = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
    return float(d * np.sqrt(n))


@pytest.mark.parametrize("rate,cv", [(5.0, 1.0), (5.0, 2.0), (0.5, 1.5), (40.0, 0.5)])
def test_schedule_follows_rate_and_cv(rate, cv):
    gaps = gaps_of(rate, cv)
    assert abs(1.0 / gaps.mean() / rate - 1) < 0.08  # standard error of the mean gap: cv / sqrt(n) <= 3%
    assert abs(gaps.std() / gaps.mean() / cv - 1) < 0.10
    assert ks_gamma(gaps, rate, cv) < 1.95  # KS critical value at alpha = 0.001


def test_schedule_is_not_poisson_when_cv_is_two():
    gaps = gaps_of(5.0, 2.0)
    assert ks_gamma(gaps, 5.0, 1.0) > 5.0  # the test above has power: CV 2 is far from exponential gaps


def test_trace_replay_is_scaled_to_the_rate_and_clipped(tmp_path):
    csv = tmp_path / "t.csv"
    rows = [(k * 2.0, 100 + k, 3000 if k == 3 else 5) for k in range(11)]
    csv.write_text("arrival_time_s,input_tokens,output_tokens\n" + "".join(f"{a},{i},{o}\n" for a, i, o in rows))
    spec = WorkloadSpec(num=0, rate=2.0, trace=str(csv), max_context=2048)
    sends = make_plan(spec.build(), warmup=2)
    assert [s.at_s for s in sends] == pytest.approx([k * 0.5 for k in range(11)])  # recorded 0.5/s -> 2/s
    assert len(sends[3].prompt_ids) + sends[3].max_tokens == 2048  # output clipped to the context
    assert [s.warmup for s in sends[:3]] == [True, True, False]


def test_prompts_are_seeded_bytes_of_the_sampled_length():
    w = workloads.synthetic(20, 1.0, 2.0, (1.1, 16, 64), (1.1, 1, 32), seed=3)
    a, b, c = make_plan(w, seed=1), make_plan(w, seed=1), make_plan(w, seed=2)
    assert a == b and a != c
    for send, req in zip(a, w.requests):
        assert len(send.prompt_ids) == req.input_len and send.max_tokens == req.output_len
        assert all(0 <= t < 256 for t in send.prompt_ids)
    assert all(s.at_s == 0.0 for s in make_plan(w, burst=True))
    with pytest.raises(ValueError, match="warm-up"):
        make_plan(w, warmup=20)


def outcome(index, scheduled, first, finish, tokens, error="", warmup=False, max_tokens=None):
    return Outcome(index, scheduled, scheduled, first, finish, 10, max_tokens or tokens, tokens, warmup, error)


HAND_MADE = [
    outcome(0, 0.0, 0.5, 1.0, 2, warmup=True),  # excluded
    outcome(1, 1.0, 1.5, 3.5, 5),  # JCT 2.5, TTFT 0.5, TPOT 0.5, norm 0.5
    outcome(2, 2.0, 2.1, 3.0, 10),  # JCT 1.0, TTFT 0.1, TPOT 0.1, norm 0.1
    outcome(3, 3.0, 3.2, 5.0, 1),  # JCT 2.0, TTFT 0.2, no TPOT, norm 2.0
    outcome(4, 4.0, 0.0, 4.3, 0, error="overloaded"),  # failed
]


def test_summary_of_hand_made_records():
    s = summarize_outcomes(HAND_MADE, SLO(ttft_s=0.3, tpot_s=0.2))
    assert s["num_requests"] == 3 and s["num_sent"] == 4 and s["errors"] == {"overloaded": 1}
    assert s["jct_s"]["mean"] == pytest.approx((2.5 + 1.0 + 2.0) / 3)
    assert s["jct_s"]["p50"] == pytest.approx(2.0)
    assert s["jct_s"]["p99"] == pytest.approx(2.0 + 0.98 * 0.5)  # linear interpolation between 2.0 and 2.5
    assert s["ttft_s"]["mean"] == pytest.approx(0.8 / 3)
    assert s["tpot_s"]["mean"] == pytest.approx(0.3)  # one-token request has no TPOT
    assert s["normalized_s"]["mean"] == pytest.approx(2.6 / 3)
    assert s["span_s"] == pytest.approx(4.0)  # first arrival 1.0 to last finish 5.0
    assert s["throughput_rps"] == pytest.approx(3 / 4.0)
    assert s["throughput_tps"] == pytest.approx(16 / 4.0)
    assert s["goodput_rps"] == pytest.approx(2 / 4.0)  # requests 2 and 3 meet TTFT<=0.3 and TPOT<=0.2
    assert s["slo_attainment"] == pytest.approx(2 / 4)  # the failed request misses the SLO
    assert "queueing_s" not in s and s["short"] == 0
    assert list(jct_values(HAND_MADE)) == pytest.approx([1.0, 2.0, 2.5])


def test_short_outputs_are_counted():
    s = summarize_outcomes([outcome(0, 0.0, 0.1, 1.0, 3, max_tokens=5)])
    assert s["short"] == 1


def test_ratios_against_fcfs_and_table():
    fast = summarize_outcomes([outcome(0, 0.0, 0.1, 1.0, 5), outcome(1, 0.0, 0.1, 2.0, 5)])
    slow = summarize_outcomes([outcome(0, 0.0, 0.4, 4.0, 5), outcome(1, 0.0, 0.4, 2.0, 5)])
    r = ratios({"fcfs": slow, "skip-join-mlfq": fast})
    assert r["fcfs"]["jct_s.mean"] == pytest.approx(1.0)
    assert r["skip-join-mlfq"]["jct_s.mean"] == pytest.approx(3.0 / 1.5)
    assert r["skip-join-mlfq"]["ttft_s.mean"] == pytest.approx(4.0)
    assert r["skip-join-mlfq"]["throughput_rps"] == pytest.approx(4.0 / 2.0)  # spans 2 s vs 4 s
    assert ratios({"mlfq": fast}) == {}
    table = format_table({"fcfs": slow, "skip-join-mlfq": fast})
    assert "jct_s.mean" in table and "2.000" in table and "ratios vs fcfs" in table


@pytest.mark.parametrize("text,error", [("ttft", "NAME=SECONDS"), ("ttl=1", "NAME=SECONDS"),
                                        ("ttft=x", "not a number"), ("tpot=-1", "> 0")])
def test_bad_slo_is_refused(text, error):
    with pytest.raises(ValueError, match=error):
        parse_slo(text)


def test_slo_and_rates_parse():
    assert parse_slo("ttft=0.5,tpot=0.05,norm=1") == SLO(0.5, 0.05, 1.0)
    assert parse_slo("") is None
    assert parse_rates("1,2.5") == [1.0, 2.5]
    with pytest.raises(ValueError, match="positive"):
        parse_rates("1,-2")


def test_plots_are_written(tmp_path):
    cdf = plot_jct_cdf({"fcfs": [1.0, 2.0, 3.0], "mlfq": [0.5, 1.0]}, tmp_path / "cdf.png")
    sweep = [{"rate": r, "policy": p, "summary": {"jct_s": {"mean": r * k, "p99": 2 * r * k}}}
             for r in (1.0, 2.0) for k, p in ((1, "mlfq"), (2, "fcfs"))]
    lat = plot_latency_vs_rate(sweep, tmp_path / "lat.png")
    for path in (cdf, lat):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    json.dumps(sweep)  # the sweep items are the JSON the CLI writes


def test_saturation_counts_tokens_while_the_batch_could_be_full():
    # a burst of 3 with batch_jobs=2: two or more are unfinished until the second finish (t=4)
    burst = [outcome(0, 0.0, 1.0, 2.0, 10), outcome(1, 0.0, 1.0, 4.0, 30), outcome(2, 0.0, 2.0, 10.0, 80)]
    sat = saturation(burst, batch_jobs=2)
    assert sat["busy_until_s"] == pytest.approx(4.0)
    # by t=4: requests 0 and 1 done (40 tokens), request 2 a quarter through its 8 s (20 tokens)
    assert sat["tokens_per_s"] == pytest.approx(60 / 4.0)
    assert sat["requests_per_s"] == pytest.approx(15.0 / 40.0)
    with pytest.raises(ValueError, match="no finished"):
        saturation([outcome(0, 0.0, 0.0, 1.0, 0, error="overloaded")], 2)
