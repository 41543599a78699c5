"""What the HTTP front door adds to the ZeroMQ client, and SmolLM2's decode throughput against transformers.

    python -m bench.front_door [--tokens 32] [--rounds 10,3] [--out bench/results/front_door.json]

One stack on SmolLM2-135M-Instruct (two stages as by default, fcfs, a batch of up to 16), launched with
its HTTP front door. At 1 and 16 concurrent streams, rounds of the same greedy request (the same prompt ids,
`--tokens` output tokens with ignore_eos) alternate between the ZeroMQ client library and streamed
POST /v1/completions through the front door, so both see the same machine load. Per request, TTFT is
send to first token (the first chunk with text, over HTTP); per token, ITL is the gap between
consecutive token events (chunks carrying text, over HTTP: the front door sends one per event, and
greedy decoding gives both the same tokens). The front door's cost is the HTTP p50 (p99) minus the
ZeroMQ p50 (p99). Throughput is output tokens over first send to last token of a round, prefill
included, against transformers' `generate` (greedy, the same prompt and length, batch 1 and 16) in this
process with the stack stopped, with as many torch threads as one worker of the stack gets (cores /
stages). Design note: on a machine whose cores other work shares, a two-thread torch op waits for its
descheduled thread at every parallel region: SmolLM2's generate ran 10x slower with 2 threads than with 1
here, so the stack keeps its default two stages of one thread each rather than one stage of two.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import numpy as np

PROMPT = ("The history of the old harbour town begins with a small fishing village on the northern coast, where "
          "the river meets the sea and the winters are long and dark.")
CONCURRENCY = (1, 16)
OVERRIDES = ["model.path=smollm2-135m", "scheduler.policy=fcfs", "scheduler.max_jobs=16", "parallel.num_stages=2"]


def prompt_ids(path: str, n: int) -> list[int]:
    from common.model.tokenizer import load_tokenizer

    ids = load_tokenizer(path).encode(PROMPT)
    return (ids * (n // len(ids) + 1))[:n]


class Sample:
    """One request's timeline: seconds from its send to each token event."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.events: list[float] = []

    def event(self) -> None:
        self.events.append(time.perf_counter() - self.start)


async def zmq_request(client: Any, ids: list[int], tokens: int) -> Sample:
    sample, seen = Sample(), 0
    async for event in client.stream(prompt_ids=ids, max_tokens=tokens, ignore_eos=True, temperature=0.0):
        if event.token_ids:
            sample.event()
            seen += len(event.token_ids)
    assert seen == tokens, f"{seen} tokens came back, {tokens} asked"
    return sample


async def http_request(http: Any, model: str, ids: list[int], tokens: int) -> Sample:
    body = {"model": model, "prompt": ids, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    sample, usage = Sample(), None
    async with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("choices") and chunk["choices"][0]["text"]:
                sample.event()
            elif chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
    assert usage == tokens, f"{usage} tokens came back, {tokens} asked"
    return sample


async def rounds(send: dict[str, Callable[[], Awaitable[Sample]]], concurrency: int, n: int) -> dict[str, list]:
    """n rounds per backend, alternating; each round sends `concurrency` requests at once."""
    out: dict[str, list] = {name: [] for name in send}
    for _ in range(n):
        for name, one in send.items():
            started = time.perf_counter()
            samples = await asyncio.gather(*(one() for _ in range(concurrency)))
            out[name].append((started, samples))
    return out


def summary(measured: list, tokens: int) -> dict[str, Any]:
    ttft = [s.events[0] for _, round_ in measured for s in round_]
    itl = [b - a for _, round_ in measured for s in round_ for a, b in zip(s.events, s.events[1:])]
    tps = [len(round_) * tokens / max(s.start - started + s.events[-1] for s in round_) for started, round_ in measured]
    pct = lambda xs, q: float(np.percentile(np.asarray(xs) * 1000, q))  # noqa: E731
    return {"requests": len(ttft), "ttft_ms": {"p50": pct(ttft, 50), "p99": pct(ttft, 99)},
            "itl_ms": {"p50": pct(itl, 50), "p99": pct(itl, 99)}, "itl_samples": len(itl),
            "output_tokens_per_s": {"median": float(np.median(tps)), "rounds": tps}}


async def measure_stack(tokens: int, prompt_len: int, n_rounds: dict[int, int]) -> dict[str, Any]:
    import httpx

    from bench.loadtest.launch import launched
    from common import config as config_mod
    from common.client import AsyncClient

    config = config_mod.load(None, OVERRIDES)
    ids = prompt_ids(config.model.path, prompt_len)
    results: dict[str, Any] = {}
    async with launched(config, http=True) as stack:
        async with AsyncClient(stack.endpoint, timeout=600) as client, \
                httpx.AsyncClient(base_url=stack.base_url, timeout=600,
                                  limits=httpx.Limits(max_connections=None, max_keepalive_connections=None)) as http:
            await client.wait_ready(60)
            model = (await http.get("/v1/models")).json()["data"][0]["id"]
            send = {"zmq": lambda: zmq_request(client, ids, tokens), "http": lambda: http_request(http, model, ids, tokens)}
            await stack.guard(rounds(send, 16, 1))  # warm-up: first batches, connections, allocator
            for c in CONCURRENCY:
                measured = await stack.guard(rounds(send, c, n_rounds[c]))
                by = {name: summary(m, tokens) for name, m in measured.items()}
                added = {k: {q: by["http"][k][q] - by["zmq"][k][q] for q in ("p50", "p99")} for k in ("ttft_ms", "itl_ms")}
                results[str(c)] = {**by, "http_minus_zmq": added}
        threads = max(1, (os.cpu_count() or 1) // config.parallel.num_stages)  # what the CPU worker takes
    return {"config": OVERRIDES, "tokens": tokens, "prompt_tokens": len(ids), "worker_threads": threads,
            "concurrency": results, "model_path": config.model.path, "ids": ids}


def transformers_generate(path: str, ids: list[int], tokens: int, threads: int, repeats: int = 3) -> dict[str, Any]:
    """Greedy `generate` of `tokens` tokens for batch 1 and 16: median output tokens per second."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = {}
    for batch in CONCURRENCY:
        inputs = torch.tensor([ids] * batch)
        kwargs = dict(attention_mask=torch.ones_like(inputs), max_new_tokens=tokens, min_new_tokens=tokens,
                      do_sample=False, pad_token_id=model.config.eos_token_id)
        with torch.inference_mode():
            model.generate(inputs, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
            rates = []
            for _ in range(repeats):
                start = time.perf_counter()
                generated = model.generate(inputs, **kwargs)
                rates.append(batch * (generated.shape[1] - inputs.shape[1]) / (time.perf_counter() - start))
        out[str(batch)] = {"output_tokens_per_s": {"median": float(np.median(rates)), "runs": rates}}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=32, help="output tokens per request")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per request")
    p.add_argument("--rounds", default="10,3", help="rounds per backend at concurrency 1 and 16")
    p.add_argument("--out", default="bench/results/front_door.json")
    args = p.parse_args()
    n_rounds = dict(zip(CONCURRENCY, (int(x) for x in args.rounds.split(","))))
    load_before = os.getloadavg()[0]
    stack = asyncio.run(measure_stack(args.tokens, args.prompt_len, n_rounds))
    reference = transformers_generate(stack["model_path"], stack.pop("ids"), args.tokens, stack["worker_threads"])
    result = {"command": "python -m bench.front_door " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
              **stack, "transformers_generate": reference,
              "loadavg_1m": {"before": load_before, "after": os.getloadavg()[0]}, "cpus": os.cpu_count()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for c, r in stack["concurrency"].items():
        print(f"{c} stream(s): TTFT p50 zmq {r['zmq']['ttft_ms']['p50']:.1f} http {r['http']['ttft_ms']['p50']:.1f} ms; "
              f"ITL p50 zmq {r['zmq']['itl_ms']['p50']:.2f} http {r['http']['itl_ms']['p50']:.2f} ms; added "
              f"{r['http_minus_zmq']}; stack {r['zmq']['output_tokens_per_s']['median']:.1f} tok/s, transformers "
              f"{reference[c]['output_tokens_per_s']['median']:.1f} tok/s")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
