"""CPU per decode iteration of each control-plane handler, in one process, with sockets that only record.

    python -m bench.control_cost [--batches 8,32] [--policy fcfs] [--iterations 300] [--repeats 7]
                                 [--profile scheduler|kvcache|ingress] [--out FILE]

The real service objects (Scheduler, KVCacheManager, the ingress shell and core) on the tiny model, one
stage, cache.swap=defer: B streamed requests (16 prompt tokens, `batch_events` as the client library
sends them) are admitted, then each iteration passes through the three as it does in the stack, with
the frames encoded and decoded: the KV manager plans the scheduler's batch, a stand-in for the worker
samples one token per job, the scheduler takes the result and picks the next batch, ingress turns the
JobEvents into the client's TokenEvents. Process time is summed per handler (decode of the incoming
message included) and divided by the iterations; the row reports the minimum and the median over the
repeats (this machine's speed drifts between runs). What it leaves out is what only a live process
pays: the event loop, the socket calls and the caches the model step has just overwritten
(`bench.overhead` measures the processes themselves).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from common import codec
from common.config import load
from common.log import setup_logging
from common.messages import BatchResult
from common.model.spec import load_spec
from common.model.tokenizer import load_tokenizer
from common.protocol import PROTOCOL_VERSION, Generate
from services.ingress.core import IngressCore, ToClient
from services.ingress.service import Ingress
from services.ingress.validate import Limits
from services.kvcache.planner import Planner
from services.kvcache.service import KVCacheManager
from services.scheduler.service import Scheduler, build_core

ROLES = ("scheduler", "kvcache", "ingress")
PROMPT_LEN = 16


class Recorder:
    """A socket stand-in that keeps the frames sent to it (awaited like pyzmq's asyncio sockets, or not)."""

    def __init__(self) -> None:
        self.sent: list[list[Any]] = []

    def send_multipart(self, frames: list[Any], copy: bool = True, flags: int = 0) -> asyncio.Future:
        self.sent.append(list(frames))
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def take(self) -> list[Any] | None:
        return self.sent.pop(0) if self.sent else None


async def one_run(batch: int, policy: str, iterations: int, profile: str = "") -> dict[str, float]:
    config = load(None, ["model.path=tiny", f"scheduler.policy={policy}", f"scheduler.max_jobs={batch}",
                         "scheduler.profile=", "cache.swap=defer", "parallel.num_stages=1",
                         "ingress.kv_overcommit=0"])
    spec = load_spec("tiny")
    to_kv, to_ingress, kv_to_scheduler, kv_to_stage0 = Recorder(), Recorder(), Recorder(), Recorder()
    scheduler = Scheduler(build_core(config.scheduler, 1, tuple(spec.eos_token_ids), send_run_order=False), 1,
                          None, to_kv, to_ingress, epoch=1)
    kv = KVCacheManager(Planner.from_config(config), None, kv_to_stage0, kv_to_scheduler)
    capacity = kv.capacity()
    per_job = -(-(PROMPT_LEN + iterations + 8) // capacity.block_size)
    if batch * per_job > capacity.device_blocks:
        raise SystemExit(f"{batch} jobs of {PROMPT_LEN + iterations + 8} tokens need {batch * per_job} KV blocks, the "
                         f"tiny model's pool has {capacity.device_blocks}: fewer --iterations or a smaller batch")
    scheduler.core.set_capacity(capacity)
    scheduler.stack_ready = True
    core = IngressCore(Limits.from_config(config, spec), load_tokenizer("tiny"), first_job_id=1)
    core.ready = True
    router = Recorder()
    ingress = Ingress(core, router, None, Recorder())
    for i in range(batch):
        request = Generate(version=PROTOCOL_VERSION, request_id=f"r{i}", prompt_ids=[(7 * i + k) % 256 for k in range(PROMPT_LEN)],
                           max_tokens=iterations + 8, ignore_eos=True, batch_events=True)
        for out in core.on_client(b"client", request, None):
            if not isinstance(out, ToClient):
                scheduler.core.submit(out.msg, time.monotonic())
    await scheduler.pump()
    spent = dict.fromkeys(ROLES, 0.0)
    to_client = 0  # messages ingress sent the client
    profiler = cProfile.Profile() if profile else None

    async def timed(role: str, work: Any) -> None:
        if profiler is not None and role == profile:
            profiler.enable()
        start = time.process_time()
        await work()
        spent[role] += time.process_time() - start
        if profiler is not None and role == profile:
            profiler.disable()

    for step in range(iterations):
        frames = to_kv.take()
        await timed("kvcache", lambda: kv.on_batch(codec.decode(frames)))
        planned, stage = kv_to_scheduler.take(), codec.decode(kv_to_stage0.take())
        tokens = [(job_id * 31 + step) % 200 + 3 for job_id in stage.job_ids]  # the worker's sampled tokens
        result = codec.encode(BatchResult(stage.batch_id, stage.job_ids, tokens, 0.001, ""))

        async def on_scheduler() -> None:
            if planned is not None:
                await scheduler.on_planned(codec.decode(planned))
            await scheduler.on_result(codec.decode(result))

        await timed("scheduler", on_scheduler)
        events = to_ingress.take()
        await timed("ingress", lambda: ingress._send(core.on_event(codec.decode(events))))
        to_client += len(router.sent)
        router.sent.clear()
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    return {**{role: seconds / iterations * 1e6 for role, seconds in spent.items()},
            "client_messages_per_iteration": to_client / iterations}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.control_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="8,32")
    parser.add_argument("--policy", default="fcfs")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--profile", choices=ROLES, help="print cProfile's top functions of one handler (one run)")
    parser.add_argument("--out", help="results JSON")
    args = parser.parse_args(argv)
    setup_logging("bench", level="info")
    if args.profile:
        for batch in [int(b) for b in args.batches.split(",")]:
            asyncio.run(one_run(batch, args.policy, args.iterations, args.profile))
        return 0
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        runs = [asyncio.run(one_run(batch, args.policy, args.iterations)) for _ in range(args.repeats)]
        row = {"batch": batch, "min_us": {r: min(x[r] for x in runs) for r in ROLES},
               "median_us": {r: statistics.median(x[r] for x in runs) for r in ROLES}, "runs": runs}
        rows.append(row)
        print(f"batch {batch:>3}: CPU us per iteration, min (median) of {args.repeats}: "
              + "  ".join(f"{r} {row['min_us'][r]:.0f} ({row['median_us'][r]:.0f})" for r in ROLES), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"policy": args.policy, "iterations": args.iterations,
                                              "repeats": args.repeats, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
