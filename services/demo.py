"""`fastserve demo` (what `make run` runs): start the stack, ask a few chat questions through the HTTP front
door, send a short mixed load through the ZeroMQ client, print a table, stop."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys
import time
import urllib.request
from dataclasses import dataclass

from common import config as config_mod
from services.launcher import Launcher, build_parser, config_from_args

PROMPTS = [
    "The quick brown fox",
    "Serving systems schedule",
    "A preemptive scheduler",
    "Hello",
    "KV cache blocks move between device and host memory when",
    "Iteration-level scheduling",
]


QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What does a scheduler do in an operating system? Answer in one sentence.",
]


def ask(base_url: str, question: str, max_tokens: int = 48) -> str:
    """One chat completion through the OpenAI-compatible HTTP front door (greedy)."""
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0}
    request = urllib.request.Request(f"{base_url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as reply:
        return json.load(reply)["choices"][0]["message"]["content"].strip()


def chat_through_http(config: config_mod.Config) -> None:
    base = f"http://{config.endpoints.http}"
    print(f"chat through the OpenAI-compatible API at {base}/v1 (model {config.model.path}):")
    for question in QUESTIONS:
        print(f"  Q: {question}\n  A: {ask(base, question)}")
    print()


@dataclass
class Record:
    name: str
    prompt_tokens: int
    output_tokens: int
    ttft_s: float
    jct_s: float
    finish: str


async def one_request(client, name: str, delay_s: float, params: dict) -> Record:
    await asyncio.sleep(delay_s)  # open loop: the request goes out on its own schedule
    start = time.perf_counter()
    first = None
    tokens, finish, prompt_tokens = 0, "", 0
    async for event in client.stream(**params):
        if first is None:
            first = time.perf_counter()
        tokens += len(getattr(event, "token_ids", None) or [])
        if hasattr(event, "finish_reason"):
            finish = event.finish_reason
            prompt_tokens = getattr(event, "prompt_tokens", 0)
    end = time.perf_counter()
    return Record(name, prompt_tokens, tokens, (first or end) - start, end - start, finish)


def mixed_load(n: int, seed: int) -> list[tuple[str, float, dict]]:
    """Short and long jobs, text and token-id prompts, arriving 20 ms apart on average."""
    rng = random.Random(seed)
    load, t = [], 0.0
    for k in range(n):
        long_job = k % 4 == 0
        max_tokens = rng.randint(120, 200) if long_job else rng.randint(4, 24)
        if k % 2:
            params = {"prompt": rng.choice(PROMPTS), "max_tokens": max_tokens}
        else:
            params = {"prompt_ids": [rng.randrange(256) for _ in range(rng.randint(8, 64))], "max_tokens": max_tokens}
        params["ignore_eos"] = True
        load.append((f"r{k:02d}{'-long' if long_job else ''}", t, params))
        t += rng.expovariate(1 / 0.02)
    return load


def print_report(records: list[Record], wall_s: float) -> None:
    print(f"{'request':<10} {'prompt':>6} {'output':>6} {'TTFT ms':>9} {'JCT ms':>9}  finish")
    for r in records:
        print(f"{r.name:<10} {r.prompt_tokens:>6} {r.output_tokens:>6} {r.ttft_s * 1e3:>9.1f} {r.jct_s * 1e3:>9.1f}  {r.finish}")
    jct = sorted(r.jct_s for r in records)
    ttft = sorted(r.ttft_s for r in records)
    p99 = jct[min(len(jct) - 1, int(0.99 * len(jct)))]
    tokens = sum(r.output_tokens for r in records)
    print()
    print(f"requests {len(records)}  output tokens {tokens}  wall {wall_s:.2f} s  throughput {tokens / wall_s:.0f} tok/s")
    print(f"JCT  mean {statistics.mean(jct) * 1e3:.1f} ms  p50 {statistics.median(jct) * 1e3:.1f} ms  p99 {p99 * 1e3:.1f} ms")
    print(f"TTFT mean {statistics.mean(ttft) * 1e3:.1f} ms  p50 {statistics.median(ttft) * 1e3:.1f} ms")


async def demo(config: config_mod.Config, n: int, log_level: str) -> int:
    from common.client import AsyncClient

    launcher = Launcher(config, log_level)
    try:
        try:
            await launcher.start()
        except RuntimeError as e:
            launcher.say(str(e))
            return 1
        if config.endpoints.http:
            await asyncio.to_thread(chat_through_http, launcher.config)
        launcher.say(f"stack ready at {launcher.endpoint()}: {config.parallel.num_stages} stage(s), "
                     f"policy {config.scheduler.policy}; sending {n} requests")
        async with AsyncClient(launcher.endpoint(), timeout=300) as client:
            start = time.perf_counter()
            load = mixed_load(n, seed=0)
            records = await asyncio.gather(*(one_request(client, name, t, p) for name, t, p in load))
            wall = time.perf_counter() - start
            stats = await client.stats()
        print_report(list(records), wall)
        whole = stats.get("kv_free_blocks") == stats.get("kv_total_blocks")
        print(f"KV pool whole after the load: {whole}  preemptions {stats.get('preemptions', 0)}")
        return 0
    finally:
        await launcher.stop()
        launcher.say("stack stopped")


def main(argv: list[str]) -> int:
    parser = build_parser("fastserve demo")
    parser.add_argument("--requests", type=int, default=24, help="number of requests to send")
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except config_mod.ConfigError as e:
        print(f"fastserve demo: {e}", file=sys.stderr)
        return 2
    import uvloop

    return uvloop.run(demo(config, args.requests, args.log_level))
