"""vLLM's serving metrics from load-test outcomes, the printed block, and launched stacks' endpoints."""

from __future__ import annotations

import pytest

from bench.loadtest.driver import Outcome
from bench.loadtest.launch import on_free_ports
from bench.loadtest.report import measured_rate
from bench.loadtest.serve_metrics import format_serve_metrics, parse_goodput, serve_metrics
from common.config import Config, Endpoints


def outcome(index: int, sent: float, first: float, finish: float, tokens: int, itl: list[float], **kw) -> Outcome:
    return Outcome(index, sent, sent, first, finish, 10, tokens, tokens, kw.pop("warmup", False), itl_s=itl, **kw)


OUTCOMES = [
    outcome(0, 0.0, 0.1, 0.5, 5, [0.1, 0.1, 0.1, 0.1]),  # ttft 100 ms, e2el 500, tpot 100
    outcome(1, 1.0, 1.3, 1.3, 1, []),  # one token: no tpot sample, tpot 0 for goodput
    outcome(2, 2.0, 2.2, 3.0, 3, [0.4, 0.4]),  # ttft 200, e2el 1000, tpot 400
    outcome(3, 2.5, 0.0, 2.6, 0, [], error="overloaded"),
    outcome(4, -1.0, -0.9, 0.0, 4, [0.3, 0.3, 0.3], warmup=True),
]


def test_vllm_definitions():
    m = serve_metrics(OUTCOMES, percentiles=[50, 99.9], percentile_metrics=["ttft", "tpot", "itl", "e2el"],
                      goodput={"ttft": 250, "tpot": 150})
    assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (3, 1, 30, 9)
    assert m["duration"] == pytest.approx(3.0)  # first measured send (0.0) to the last end (3.0)
    assert m["request_throughput"] == pytest.approx(1.0) and m["output_throughput"] == pytest.approx(3.0)
    assert m["total_token_throughput"] == pytest.approx(13.0)
    assert m["request_goodput"] == pytest.approx(1 / 3)  # request 1's TTFT of 300 ms and 2's TPOT of 400 ms miss
    assert m["mean_ttft_ms"] == pytest.approx(200.0) and m["median_ttft_ms"] == pytest.approx(200.0)
    assert m["mean_tpot_ms"] == pytest.approx(250.0) and m["p50_tpot_ms"] == pytest.approx(250.0)
    assert m["mean_itl_ms"] == pytest.approx(1000 * 1.2 / 6) and m["p99.9_itl_ms"] == pytest.approx(400.0, rel=1e-3)
    assert m["mean_e2el_ms"] == pytest.approx(1000 * 1.8 / 3) and m["std_e2el_ms"] > 0
    text = format_serve_metrics(m, [50, 99.9], ["ttft", "tpot", "itl", "e2el"])
    for label in ("Successful requests:                     3", "Request goodput (req/s):",
                  "Mean TTFT (ms):                          200.00", "P99.9 ITL (ms):", "Median E2EL (ms):"):
        assert label in text, text


def test_goodput_syntax_and_defaults():
    assert parse_goodput(["ttft:500", "e2el:2000.5"]) == {"ttft": 500.0, "e2el": 2000.5}
    for bad in (["ttfb:5"], ["ttft:x"], ["tpot:0"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)
    m = serve_metrics(OUTCOMES)
    assert "request_goodput" not in m and "p99_ttft_ms" in m and "mean_e2el_ms" not in m


def test_the_measured_rate_is_of_the_sends():
    assert measured_rate(OUTCOMES) == pytest.approx(3 / 2.5)
    assert measured_rate(OUTCOMES[:1]) is None


def test_a_launched_stack_keeps_the_endpoints_the_user_set():
    user = Config().replace(endpoints={"client": "tcp://127.0.0.1:7001", "kvcache": "tcp://127.0.0.1:7100"})
    ep = on_free_ports(user).endpoints
    assert (ep.client, ep.kvcache, ep.stages, ep.http) == ("tcp://127.0.0.1:7001", "tcp://127.0.0.1:7100", (), "")
    assert ep.ingress != Endpoints().ingress and ep.scheduler != Endpoints().scheduler
    ep = on_free_ports(Config(), http=True).endpoints
    assert ep.http.startswith("127.0.0.1:") and ep.http != Endpoints().http
    assert len(ep.stages) == Config().parallel.num_stages
    ep = on_free_ports(Config().replace(endpoints={"http": "127.0.0.1:9911"})).endpoints
    assert ep.http == "127.0.0.1:9911"  # set by the user: the front door runs there
