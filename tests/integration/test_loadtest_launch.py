"""`fastserve loadtest --launch --policies ...` starts a stack per policy, runs the load, writes JSON and PNGs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ["skip-join-mlfq", "mlfq", "fcfs", "rtc"]


@pytest.mark.slow
def test_policies_side_by_side_write_json_and_plots(tmp_path):
    out, plots = tmp_path / "lt.json", tmp_path / "img" / "lt"
    argv = [sys.executable, "-m", "services.cli", "loadtest", "--launch", "--policies", ",".join(POLICIES),
            "--num", "10", "--rates", "5,10", "--cv", "2", "--input-zipf", "1.1,4,64", "--output-zipf", "1.1,1,32",
            "--warmup", "2", "--seed", "3", "--slo", "ttft=5,tpot=1", "--out", str(out), "--plots", str(plots),
            "--no-progress", "--set", "cache.num_host_blocks=256"]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ratios vs fcfs") == 2

    result = json.loads(out.read_text())
    assert result["config"]["model"]["path"] == "tiny"  # launched stacks compare policies on the tiny model
    runs = {(r["policy"], r["rate"]): r for r in result["runs"]}
    assert sorted(runs) == sorted((p, r) for p in POLICIES for r in (5.0, 10.0))
    lengths = None
    for (policy, rate), run in runs.items():
        s = run["summary"]
        assert s["num_sent"] == 8 and s["num_requests"] == 8 and s["errors"] == {} and s["short"] == 0
        assert 0 < s["jct_s"]["p50"] <= s["jct_s"]["p99"] and s["throughput_tps"] > 0
        assert 0 <= s["slo_attainment"] <= 1
        assert len(run["records"]) == 10 and sum(r["warmup"] for r in run["records"]) == 2
        same = [(r["input_len"], r["max_tokens"], round(r["scheduled_s"] * rate, 9)) for r in run["records"]]
        lengths = lengths or same
        assert same == lengths  # same workload and seed for every policy and rate (arrivals scale with 1/rate)
        assert run["workload"]["arrivals"] == {"process": "gamma", "rate": rate, "cv": 2.0}
    for rate in ("5.0", "10.0"):
        ratio = result["ratios"][rate]
        assert ratio["fcfs"]["jct_s.mean"] == pytest.approx(1.0)
        assert set(ratio) == set(POLICIES) and all(v > 0 for r in ratio.values() for v in r.values())
    pngs = sorted(p.name for p in plots.parent.iterdir())
    assert pngs == ["lt_jct_cdf_r10.0.png", "lt_jct_cdf_r5.0.png", "lt_latency_vs_rate.png"]
    for name in pngs:
        data = (plots.parent / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10000


def test_bad_arguments_are_refused():
    run = lambda *a: subprocess.run([sys.executable, "-m", "services.cli", "loadtest", *a], cwd=ROOT,  # noqa: E731
                                    capture_output=True, text=True, timeout=60)
    both = run("--launch", "--address", "tcp://127.0.0.1:1", "--rate", "1")
    assert both.returncode == 2 and "exactly one of --address" in both.stderr
    bad_policy = run("--launch", "--policies", "fcfs,lifo", "--rate", "1")
    assert bad_policy.returncode == 2 and "unknown policy lifo" in bad_policy.stderr
    wrong_target = run("--backend", "openai", "--address", "tcp://127.0.0.1:1", "--rate", "1")
    assert wrong_target.returncode == 2 and "--base-url for --backend openai" in wrong_target.stderr
    no_rate = run("--launch")
    assert no_rate.returncode == 2 and "--rate" in no_rate.stderr


def test_the_openai_backend_against_a_launched_front_door_keeps_the_users_endpoint(tmp_path):
    from bench.loadtest.launch import free_ports

    out, client = tmp_path / "lt.json", f"tcp://127.0.0.1:{free_ports(1)[0]}"
    argv = [sys.executable, "-m", "services.cli", "loadtest", "--backend", "openai", "--launch", "--num", "6",
            "--rate", "20", "--input-zipf", "1.1,4,32", "--output-zipf", "1.1,2,16", "--seed", "1", "--warmup", "1",
            "--percentiles", "50,99", "--percentile-metrics", "ttft,tpot,itl,e2el", "--goodput", "ttft:60000",
            "--set", f"endpoints.client={client}", "--out", str(out), "--no-progress"]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Serving Benchmark Result" in proc.stdout and "P99 E2EL (ms):" in proc.stdout
    assert "== arrival rate measured: " in proc.stdout and "req/s (asked: 20.0 req/s)" in proc.stdout
    (run,) = json.loads(out.read_text())["runs"]
    assert run["backend"] == "openai" and run["target"].startswith("http://127.0.0.1:")
    assert run["endpoints"]["client"] == client  # the endpoint the user set, not a free port of its own
    serve = run["serve"]
    assert (serve["completed"], serve["failed"]) == (5, 0) and serve["request_goodput"] > 0
    assert 0 < serve["median_ttft_ms"] <= serve["p99_ttft_ms"] and serve["mean_itl_ms"] > 0
    assert serve["total_output_tokens"] == sum(r["max_tokens"] for r in run["records"] if not r["warmup"])
    assert run["measured_rate"] > 0
