"""Goodput against offered load, from below saturation to twice it: the curve should flatten, not fall.

    python -m bench.overload --out bench/results/overload.json [--loads 0.5,0.75,1,1.5,2] [--duration 20]

One stack (the tiny model, KV pools small enough that the load outgrows them) serves every run. First
its capacity: a closed loop that keeps `--concurrency` jobs in the system for `--duration` seconds gives
requests/s at saturation. Then, for each load factor, Poisson arrivals at factor x that rate for
`--duration` seconds. Throughput is the output tokens of requests that ended well within the window, per
second; goodput counts only those that also met the latency objective (`--slo`, by default 5 times the
median latency at saturation): a stack that queues without bound keeps its throughput while every
request misses its objective. A request refused with `overloaded` costs the client one round trip and
the stack nothing. The JSON holds every run; the table is the curve.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.loadtest.launch import launched
from common import config as config_mod
from common.client import AsyncClient, FastServeError

PROMPT, OUTPUT = (32, 32), (96, 96)  # token ranges per request (uniform); by default all the same work
STACK = ["model.path=tiny", "parallel.num_stages=1", "scheduler.policy=skip-join-mlfq", "scheduler.profile=",
         "cache.num_gpu_blocks=48", "cache.num_host_blocks=96", "cache.headroom_blocks=2", "cache.swap=proactive",
         "scheduler.max_jobs=8", "ingress.client_lease_s=0"]


@dataclass
class Run:
    load: float  # offered load as a multiple of the saturation rate (0 = the saturation run itself)
    rate: float  # arrivals per second
    sent: int = 0
    ok: int = 0
    throughput_tok_s: float = 0.0  # output tokens of requests that ended well in the window, per second
    goodput_tok_s: float = 0.0  # the same, of those within the latency objective
    slo_s: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)  # error code -> requests
    latency_p50_s: float = 0.0
    latency_p99_s: float = 0.0
    kv_dropped: int = 0  # KV discarded for lack of room (each one recomputed), during the run
    swaps_out: int = 0
    max_jobs_in_system: int = 0  # sampled every 0.2 s
    max_kv_reserved_blocks: int = 0  # worst-case KV of the jobs in the system, sampled with it
    kv_budget_blocks: int = 0


def request(rng: random.Random) -> tuple[list[int], int]:
    return [rng.randrange(256) for _ in range(rng.randint(*PROMPT))], rng.randint(*OUTPUT)


async def one(client: AsyncClient, rng: random.Random, ends: list, start: float) -> None:
    prompt_ids, output = request(rng)
    sent = time.monotonic()
    try:
        await client.generate(prompt_ids=prompt_ids, max_tokens=output, ignore_eos=True)
        ends.append(("ok", sent - start, time.monotonic() - start, output))
    except FastServeError as e:
        ends.append((e.code, sent - start, time.monotonic() - start, 0))


def summarise(run: Run, ends: list, duration: float, before: dict, after: dict, slo_s: float = 0.0) -> Run:
    ok = sorted((e - s, n) for code, s, e, n in ends if e <= duration and code == "ok")
    run.sent = len(ends)
    run.ok = len(ok)
    run.throughput_tok_s = round(sum(n for _, n in ok) / duration, 1)
    run.slo_s = round(slo_s, 3)
    met = sum(n for latency, n in ok if latency <= slo_s) if slo_s else sum(n for _, n in ok)
    run.goodput_tok_s = round(met / duration, 1)
    run.errors = dict(Counter(code for code, *_ in ends if code != "ok"))
    if ok:
        run.latency_p50_s = round(ok[len(ok) // 2][0], 3)
        run.latency_p99_s = round(ok[min(len(ok) - 1, int(0.99 * len(ok)))][0], 3)
    run.kv_dropped = int(after.get("dropped", 0) - before.get("dropped", 0))
    run.swaps_out = int(after.get("swaps_out", 0) - before.get("swaps_out", 0))
    return run


async def drain(client: AsyncClient) -> None:
    """Wait until the stack holds no job (the next run starts from an empty system)."""
    for _ in range(600):
        stats = await client.stats()
        if stats["jobs_live"] == 0 and stats["kv_whole"]:
            return
        await asyncio.sleep(0.1)


async def saturation(client: AsyncClient, concurrency: int, duration: float, seed: int) -> Run:
    rng, ends, start = random.Random(seed), [], time.monotonic()
    before = await client.stats()

    async def loop() -> None:
        while time.monotonic() - start < duration:
            await one(client, rng, ends, start)

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    run = summarise(Run(0.0, 0.0), ends, duration, before, await client.stats())
    run.rate = round(run.ok / duration, 3)
    return run


async def offered(client: AsyncClient, load: float, rate: float, duration: float, seed: int, slo_s: float) -> Run:
    rng, ends, tasks = random.Random(seed), [], []
    before = await client.stats()
    peaks = {"jobs": 0, "kv": 0}

    async def sample() -> None:
        while True:
            stats = await client.stats()
            peaks["jobs"] = max(peaks["jobs"], int(stats["ingress_jobs_in_system"]))
            peaks["kv"] = max(peaks["kv"], int(stats.get("ingress_kv_reserved_blocks", 0)))
            await asyncio.sleep(0.2)

    watch = asyncio.create_task(sample())
    start = time.monotonic()
    at = 0.0
    while True:
        at += rng.expovariate(rate)
        if at >= duration:
            break
        await asyncio.sleep(max(0.0, start + at - time.monotonic()))
        tasks.append(asyncio.create_task(one(client, rng, ends, start)))
    await asyncio.sleep(max(0.0, start + duration - time.monotonic()))
    watch.cancel()
    run = summarise(Run(load, round(rate, 3)), list(ends), duration, before, await client.stats(), slo_s)
    for task in tasks:
        task.cancel()  # what is still in the system after the window does not count; cancel it
    await asyncio.gather(watch, *tasks, return_exceptions=True)
    run.sent = len(tasks)
    run.max_jobs_in_system, run.max_kv_reserved_blocks = peaks["jobs"], peaks["kv"]
    run.kv_budget_blocks = int(before.get("ingress_kv_budget_blocks", 0))
    return run


async def measure(loads: list[float], duration: float, concurrency: int, overrides: list[str], seed: int = 0,
                  slo_s: float = 0.0) -> dict:
    config = config_mod.load(None, [*STACK, *overrides])
    async with launched(config) as stack:
        async with AsyncClient(stack.endpoint, timeout=300) as client:
            await client.wait_ready(timeout=120)
            sat = await stack.guard(saturation(client, concurrency, duration, seed))
            slo_s = slo_s or 5 * sat.latency_p50_s
            await drain(client)
            runs = []
            for i, load in enumerate(loads):
                runs.append(await stack.guard(offered(client, load, load * sat.rate, duration, seed + 1 + i, slo_s)))
                await drain(client)
            final = await client.stats()
    return {"saturation": asdict(sat), "runs": [asdict(r) for r in runs], "duration_s": duration,
            "request": {"prompt_tokens": list(PROMPT), "output_tokens": list(OUTPUT)}, "stack": [*STACK, *overrides],
            "kv_whole_after": int(final["kv_whole"])}


def table(result: dict) -> str:
    sat = result["saturation"]
    slo = result["runs"][0]["slo_s"] if result["runs"] else 0.0
    lines = [f"saturation: {sat['rate']} req/s, {sat['throughput_tok_s']} tok/s (closed loop, p50 {sat['latency_p50_s']} s); "
             f"latency objective {slo} s",
             "| load | req/s | sent | ok | throughput tok/s | goodput tok/s | goodput / at 1x | overloaded | other errors "
             "| p50 s | p99 s | KV dropped | most jobs in system |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    at_one = next((r["goodput_tok_s"] for r in result["runs"] if r["load"] == 1.0), 0.0)
    for r in result["runs"]:
        other = sum(n for code, n in r["errors"].items() if code != "overloaded")
        ratio = f"{r['goodput_tok_s'] / at_one:.2f}" if at_one else "-"
        lines.append(f"| {r['load']:g}x | {r['rate']} | {r['sent']} | {r['ok']} | {r['throughput_tok_s']} | "
                     f"{r['goodput_tok_s']} | {ratio} | {r['errors'].get('overloaded', 0)} | {other} | "
                     f"{r['latency_p50_s']} | {r['latency_p99_s']} | {r['kv_dropped']} | {r['max_jobs_in_system']} |")
    return "\n".join(lines)


def span(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    return int(lo), int(hi or lo)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__.splitlines()[0])
    p.add_argument("--loads", default="0.5,0.75,1,1.5,2", help="offered loads, multiples of the saturation rate")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per run")
    p.add_argument("--concurrency", type=int, default=8, help="jobs kept in the system by the saturation run")
    p.add_argument("--prompt", default="32", help="prompt tokens: N, or LO:HI drawn uniformly")
    p.add_argument("--output", default="96", help="output tokens: N, or LO:HI drawn uniformly")
    p.add_argument("--slo", type=float, default=0.0, help="latency objective, seconds (0: 5 x the median at saturation)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="stack override")
    p.add_argument("--out", help="JSON output path")
    args = p.parse_args(argv)
    global PROMPT, OUTPUT
    PROMPT, OUTPUT = span(args.prompt), span(args.output)
    import uvloop

    result = uvloop.run(measure([float(x) for x in args.loads.split(",")], args.duration, args.concurrency, args.set,
                                slo_s=args.slo))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
