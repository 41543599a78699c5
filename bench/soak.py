"""A long run at a steady share of capacity with swaps happening: does anything leak, is anything lost?

    python -m bench.soak --minutes 30 --load 0.7 --out bench/results/soak.json

One stack (the tiny model, 2 stages, device pool small enough that preempted jobs swap to the host pool).
Its capacity comes from a closed loop first (bench.overload); then Poisson arrivals at `--load` times it,
mixed lengths, for `--minutes`. Every `--sample` seconds: the resident memory of each process of the stack
and the stack's counters. A request is lost when it has neither its output nor an error when the run
ends (each is given 300 s); the KV pools must be whole afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

from bench import overload
from bench.loadtest.launch import launched
from common import config as config_mod
from common.client import AsyncClient

STACK = ["model.path=tiny", "parallel.num_stages=2", "scheduler.policy=skip-join-mlfq", "scheduler.profile=",
         "cache.num_gpu_blocks=96", "cache.num_host_blocks=512", "cache.headroom_blocks=2", "cache.swap=proactive",
         "scheduler.max_jobs=8", "scheduler.base_quantum_s=0.002", "ingress.client_lease_s=0"]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def soak(minutes: float, load: float, sample_s: float, seed: int) -> dict:
    overload.PROMPT, overload.OUTPUT = (16, 256), (16, 256)
    config = config_mod.load(None, STACK)
    async with launched(config) as stack:
        pids = {c.name: c.proc.pid for c in stack.launcher.children}
        async with AsyncClient(stack.endpoint, timeout=300) as client:
            await client.wait_ready(timeout=120)
            sat = await stack.guard(overload.saturation(client, 8, 20.0, seed))
            await overload.drain(client)
            rate = load * sat.rate
            rng, ends, tasks, samples = random.Random(seed + 1), [], [], []
            start = time.monotonic()
            next_sample, at = 0.0, 0.0

            async def arrivals() -> None:
                nonlocal at
                while at < minutes * 60:
                    at += rng.expovariate(rate)
                    await asyncio.sleep(max(0.0, start + at - time.monotonic()))
                    tasks.append(asyncio.create_task(overload.one(client, rng, ends, start)))

            sender = asyncio.create_task(arrivals())
            while not sender.done():
                now = time.monotonic() - start
                if now >= next_sample:
                    stats = await client.stats()
                    samples.append({"t_s": round(now, 1), "rss_kib": {n: rss_kib(p) for n, p in pids.items()},
                                    **{k: stats.get(k, 0) for k in ("jobs_live", "swaps_out", "swaps_in", "dropped",
                                                                     "kv_free_blocks", "host_blocks_free")}})
                    next_sample += sample_s
                await asyncio.sleep(0.5)
            await stack.guard(asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 330))
            await overload.drain(client)
            final = await client.stats()
            rss_end = {n: rss_kib(p) for n, p in pids.items()}
    codes = Counter(code for code, *_ in ends)
    first = samples[min(1, len(samples) - 1)]["rss_kib"]  # after the first minute's warm-up
    return {
        "minutes": minutes, "load": load, "saturation_req_s": sat.rate, "rate_req_s": round(rate, 3),
        "sent": len(tasks), "ended": len(ends), "lost": len(tasks) - len(ends), "outcomes": dict(codes),
        "swaps_out": final.get("swaps_out", 0), "swaps_in": final.get("swaps_in", 0),
        "kv_dropped": final.get("dropped", 0), "kv_whole_after": int(final["kv_whole"]),
        "host_blocks_free_after": final.get("host_blocks_free"), "host_blocks_total": final.get("host_blocks_total"),
        "rss_kib_first_sample": first, "rss_kib_end": rss_end,
        "rss_growth_pct": {n: round(100 * (rss_end[n] - first[n]) / first[n], 2) for n in first if first[n]},
        "samples": samples, "stack": STACK,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--load", type=float, default=0.7, help="share of the measured capacity offered")
    p.add_argument("--sample", type=float, default=60.0, help="seconds between samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON output path")
    args = p.parse_args(argv)
    import uvloop

    result = uvloop.run(soak(args.minutes, args.load, args.sample, args.seed))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    summary = {k: v for k, v in result.items() if k not in ("samples", "stack")}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
