"""Speed of the code itself: policy decision time with 10,000 queued jobs, and simulator throughput.

    python -m bench.sim.speed [--requests 100000] [--out bench/results/sim_speed.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from bench.costmodel import roofline
from bench.sim.engine import simulate
from bench.sim.kv import kv_memory_factory
from bench.workloads import synthetic
from common.config import POLICIES, CacheConfig, SchedulerConfig
from services.scheduler.job import Job
from services.scheduler.policies import make_policy


def decision_time(name: str, queued: int = 10_000, iterations: int = 200) -> dict[str, float]:
    """schedule() latency over `iterations` iterations with `queued` jobs held (mixed prompt lengths,
    a third of them already decoding), each iteration accounted so that demotions happen."""
    cost = roofline("A100-40GB", "llama3-8b")
    policy = make_policy(SchedulerConfig(policy=name), cost.prefill_time)
    rng = np.random.default_rng(0)
    for i in range(queued):
        job = Job(i, arrival_s=i * 1e-4, prompt_len=int(rng.integers(1, 2048)), max_tokens=1024, oracle_output_len=int(rng.integers(1, 1024)))
        if i % 3 == 0:  # decoding: prompt computed, one token sampled
            job.num_generated, job.num_computed = 1, job.prompt_len
        policy.add(job, job.arrival_s)
    now, times, cpu, order_s = 1.0, [], [], []
    for k in range(iterations):
        c0, t0 = time.thread_time(), time.perf_counter()
        batch = policy.schedule(now, lambda j: True)
        times.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
        step = cost.iteration_time([j.num_new_tokens for j in batch if j.is_prefill], [j.context_len for j in batch if not j.is_prefill])
        now += step
        for job in batch:
            job.num_computed = job.context_len
            job.num_generated += 1
        policy.update(batch, step, now)
        if k % 20 == 0:
            t0 = time.perf_counter()
            policy.run_order(now)
            order_s.append(time.perf_counter() - t0)
    us, cpu_us = np.array(times) * 1e6, np.array(cpu) * 1e6
    return {
        "queued_jobs": queued,
        "iterations": iterations,
        # wall time includes being descheduled on a shared machine; CPU time of this thread does not
        **{f"schedule_us_p{p}": float(np.percentile(us, p)) for p in (50, 90, 99)},
        **{f"schedule_cpu_us_p{p}": float(np.percentile(cpu_us, p)) for p in (50, 90, 99)},
        "schedule_cpu_us_max": float(cpu_us.max()),
        "run_order_ms_mean": float(np.mean(order_s) * 1e3),
    }


def sim_speed(num_requests: int, rate: float, output_high: int, kv: bool = False) -> dict[str, float]:
    workload = synthetic(num_requests, rate=rate, cv=1.0, output_zipf=(1.1, 1, output_high), seed=7)
    cost = roofline("A100-40GB", "gpt3-175b", tp=8, pp=2)
    scheduler = SchedulerConfig()
    memory = kv_memory_factory(CacheConfig(), scheduler, cost)() if kv else None
    t0 = time.perf_counter()
    result = simulate(workload, make_policy(scheduler, cost.prefill_time), cost, memory)
    wall = time.perf_counter() - t0
    return {
        "memory": result.stats["memory"],
        "requests": num_requests,
        "workload": workload.describe(),
        "iterations": result.stats["iterations"],
        "wall_s": wall,
        "requests_per_s": num_requests / wall,
        "iterations_per_s": result.stats["iterations"] / wall,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=100_000)
    p.add_argument("--rate", type=float, default=5.0, help="arrivals per second (GPT-3 175B, 16 x A100-40GB)")
    p.add_argument("--output-high", type=int, default=512, help="largest output length of the Zipf")
    p.add_argument("--kv-requests", type=int, default=20_000, help="requests for the run with the KV planner")
    p.add_argument("--out", default="bench/results/sim_speed.json")
    args = p.parse_args(argv)
    result = {
        "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine()},
        "decision": {name: decision_time(name) for name in POLICIES},
        "simulator": sim_speed(args.requests, args.rate, args.output_high),
        "simulator_kv": sim_speed(args.kv_requests, args.rate, args.output_high, kv=True),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    brief = {k: {n: v for n, v in result[k].items() if n != "workload"} for k in ("simulator", "simulator_kv")}
    print(json.dumps({"decision": result["decision"], **brief}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
