"""The simulator's measurements: paper-style load sweep, real traces, and the demote_to choice.

    python -m bench.sim.sweep paper   # GPT-3 175B on 16 x A100-40GB: rate x CV 1/2/4, then Zipf skew
    python -m bench.sim.sweep traces  # Azure code/conv and Mooncake conversation traces
    python -m bench.sim.sweep demote  # skip-join MLFQ with demote_to front vs back
    python -m bench.sim.sweep plots   # PNGs under docs/img/ from the JSON under bench/results/

Each writes bench/results/sim_<name>.json with the workload's description, the cost model and a
summary per policy, so every number in docs/benchmarks.md can be traced to its inputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench import workloads
from bench.costmodel import roofline
from bench.sim.kv import kv_memory_factory
from bench.sim.runner import run_policies
from common.config import POLICIES, CacheConfig, SchedulerConfig

RESULTS = Path("bench/results")
PAPER = dict(gpu="A100-40GB", model="gpt3-175b", tp=8, pp=2)  # 2 nodes x 8 GPUs: TP inside a node
PAPER_WORKLOAD = dict(input_zipf=(1.1, 16, 2048), output_zipf=(1.1, 1, 2048), max_context=2048)
PAPER_RATES = (1.0, 2.0, 3.0, 4.0, 5.0)
PAPER_CVS = (1.0, 2.0, 4.0)
# Zipf exponent of input and output lengths (the paper's skew axis), at one rate and CV
PAPER_SKEWS = (1.0, 1.2, 1.4)
SKEW_POINT = dict(rate=4.0, cv=2.0)
# (trace, rates in requests per second) on Llama-3-8B, one H100-80GB, context 8192
TRACE_RUNS = (
    ("azure-conv", (3.0, 6.0)),
    ("azure-code", (3.0, 6.0)),
    ("mooncake-conv", (0.5, 1.0, 3.0)),
    ("mooncake-synthetic", (1.0, 3.0)),
)
TRACE_COST = dict(gpu="H100-80GB", model="llama3-8b", tp=1, pp=1)


def _compact(summary: dict[str, Any]) -> dict[str, Any]:
    keep = ("num_requests", "span_s", "jct_s", "ttft_s", "tpot_s", "normalized_s", "queueing_s", "preemptions", "swaps", "throughput_rps", "throughput_tps", "sim")
    return {k: summary[k] for k in keep if k in summary}


def _point(workload, cost, scheduler, policies, cache) -> dict[str, Any]:
    t0 = time.perf_counter()
    results = run_policies(workload, cost, scheduler, policies, kv_memory_factory(cache, scheduler, cost))
    fcfs = results.get("fcfs")
    point = {
        "workload": workload.describe(),
        "wall_s": time.perf_counter() - t0,
        "policies": {name: _compact(r) for name, r in results.items()},
    }
    if fcfs:
        # share of time the pipeline stages are busy under fcfs: how close the rate is to saturation
        point["stage_utilization_fcfs"] = fcfs["sim"]["busy_s"] / cost.num_stages / fcfs["span_s"]
    print(f"  {workload.describe().get('arrivals', workload.describe().get('trace'))} {point['wall_s']:.1f}s", file=sys.stderr)
    return point


def paper(n: int, rates, cvs, seed: int) -> dict[str, Any]:
    cost = roofline(**PAPER)
    scheduler, cache = SchedulerConfig(), CacheConfig()
    points = []
    for cv in cvs:
        for rate in rates:
            wl = workloads.synthetic(n, rate, cv, seed=seed, **PAPER_WORKLOAD)
            points.append({"cv": cv, "rate": rate, "zipf": 1.1, **_point(wl, cost, scheduler, POLICIES, cache)})
    for skew in PAPER_SKEWS:
        shape = dict(PAPER_WORKLOAD, input_zipf=(skew, 16, 2048), output_zipf=(skew, 1, 2048))
        wl = workloads.synthetic(n, SKEW_POINT["rate"], SKEW_POINT["cv"], seed=seed, **shape)
        points.append({**SKEW_POINT, "zipf": skew, **_point(wl, cost, scheduler, POLICIES, cache)})
    return {"cost": cost.describe(), "scheduler": dataclasses.asdict(scheduler), "cache": dataclasses.asdict(cache), "points": points}


def traces(limit: int) -> dict[str, Any]:
    cost = roofline(**TRACE_COST)
    scheduler, cache = SchedulerConfig(), CacheConfig()
    points = []
    for name, rates in TRACE_RUNS:
        for rate in rates:
            wl = workloads.trace(name, rate=rate, max_context=8192, limit=limit)
            points.append({"trace": name, "rate": rate, **_point(wl, cost, scheduler, POLICIES, cache)})
    return {"cost": cost.describe(), "scheduler": dataclasses.asdict(scheduler), "points": points}


def demote(n: int, rate: float, seeds) -> dict[str, Any]:
    cost = roofline(**PAPER)
    cache = CacheConfig()
    points = []
    for cv in PAPER_CVS:
        for seed in seeds:
            wl = workloads.synthetic(n, rate, cv, seed=seed, **PAPER_WORKLOAD)
            row = {"cv": cv, "seed": seed, "rate": rate}
            for where in ("front", "back"):
                scheduler = SchedulerConfig(demote_to=where)
                r = run_policies(wl, cost, scheduler, ["skip-join-mlfq"], kv_memory_factory(cache, scheduler, cost))
                row[where] = _compact(r["skip-join-mlfq"])
            points.append(row)
            print(f"  demote cv={cv} seed={seed}", file=sys.stderr)
    return {"cost": cost.describe(), "points": points}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["paper", "traces", "demote", "plots"])
    p.add_argument("--num", type=int, default=1000, help="synthetic requests per point")
    p.add_argument("--limit", type=int, default=2000, help="trace rows per point")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rates", default=",".join(map(str, PAPER_RATES)))
    args = p.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.what == "plots":
        from bench.sim.plots import plot_all

        plot_all(RESULTS, Path("docs/img"))
        return 0
    if args.what == "paper":
        out = paper(args.num, [float(r) for r in args.rates.split(",")], PAPER_CVS, args.seed)
    elif args.what == "traces":
        out = traces(args.limit)
    else:
        out = demote(args.num, 3.0, (1, 2, 3))
    path = RESULTS / f"sim_{args.what}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
