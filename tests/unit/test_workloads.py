"""Synthetic workloads have the asked-for statistics; trace replay scales and clips as it says."""

from __future__ import annotations

import numpy as np
import pytest

from bench.workloads import DEFAULT_TRACES, clip, gamma_arrivals, read_trace, synthetic, trace, zipf_lengths


def test_zipf_lengths_bounded_and_skewed():
    rng = np.random.default_rng(0)
    xs = zipf_lengths(20000, 1.0, 1, 100, rng)
    assert xs.min() == 1 and xs.max() == 100
    # P(1) = 1 / H(100) = 0.1928 for exponent 1
    assert np.mean(xs == 1) == pytest.approx(1 / sum(1 / k for k in range(1, 101)), abs=0.01)
    assert np.all(zipf_lengths(10, 0.0, 7, 7, rng) == 7)
    with pytest.raises(ValueError, match="low <= high"):
        zipf_lengths(1, 1.0, 5, 4, rng)


@pytest.mark.parametrize("cv", [1.0, 2.0, 4.0])
def test_gamma_arrivals_rate_and_cv(cv):
    t = gamma_arrivals(40000, rate=5.0, cv=cv, rng=np.random.default_rng(1))
    gaps = np.diff(t)
    assert t[0] == 0.0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(0.2, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.08)


def test_synthetic_is_seeded_and_described():
    a = synthetic(100, rate=2.0, cv=2.0, seed=5)
    b = synthetic(100, rate=2.0, cv=2.0, seed=5)
    assert a.requests == b.requests
    d = a.describe()
    assert d["arrivals"] == {"process": "gamma", "rate": 2.0, "cv": 2.0}
    assert d["num_requests"] == 100 and d["input_len"]["exponent"] == 1.1


def test_clip_to_context():
    ins, outs, n = clip(np.array([10, 5000, 100, 3000]), np.array([10, 10, 4000, 3000]), 4096)
    # output keeps up to half the context; the prompt gets the rest
    assert list(ins) == [10, 4086, 100, 2048] and list(outs) == [10, 10, 3996, 2048] and n == 3


def test_trace_replay_scales_time_and_clips(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("arrival_time_s,input_tokens,output_tokens\n0.0,10,5\n1.0,20,6\n2.0,9000,7\n")
    wl = trace(str(path), rate=4.0, max_context=4096)
    assert [r.arrival_s for r in wl.requests] == [0.0, 0.25, 0.5]  # recorded 1/s, scaled to 4/s
    assert wl.requests[2].input_len == 4089 and wl.requests[2].output_len == 7
    d = wl.describe()
    assert d["time_scale"] == 0.25 and d["clipped"] == 1 and d["recorded_rate"] == 1.0
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match="header"):
        read_trace(bad)
    with pytest.raises(FileNotFoundError):
        trace(str(tmp_path / "missing.csv"))


@pytest.mark.skipif(not (DEFAULT_TRACES / "azure2023_conv.csv").is_file(), reason="shared traces not present")
def test_shared_trace_by_name():
    wl = trace("azure-conv", limit=500)
    assert len(wl.requests) == 500 and wl.requests[0].arrival_s == 0.0
    assert wl.describe()["trace"] == "azure2023_conv.csv"
