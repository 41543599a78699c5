"""What the processes and sockets cost: decode throughput of the stack against the in-process model loop.

    python -m bench.overhead [--batches 8,32] [--tokens 128] [--stages 2] [--repeats 3]
                             [--control-cpus N] [--out FILE]

In-process: the same stages (2 by default) run one after the other in this process, one torch thread,
stepping a batch of decode jobs. Stack: `fastserve up` with fcfs, one batch of B jobs
(scheduler.max_jobs=B), B requests of the same shape sent at once, each worker with one torch thread.
Per batch size the two alternate (in-process, stack, in-process, ... --repeats stack runs); each stack
run is compared with the mean of the in-process runs either side of it (this machine's speed drifts by
tens of percent within minutes), and the row is the repeat with the median ratio. With
--control-cpus N > 0 the stack runs with parallel.control_cpus=N (the control plane on the first N
cores, the workers on the rest); this client then runs on the control cores too, and the in-process
loop on stage 0's cores.

Decode throughput counts tokens after every job's first token; per-iteration time is the gap between
consecutive tokens of a job as the client sees it; the time added per iteration is the stack's median
(p99) gap minus the in-process median (p99) step, and, free of the drift, the stack's median gap minus
its workers' own compute per iteration. CPU per iteration is each process's user + system time (from
/proc; `client` is this process) over the measured window, divided by the iterations the scheduler
counted in it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from workers.model.sampling import SamplingParams
from workers.offline import OfflineEngine, _Job

PROMPT_LEN = 16
CONTROL_PLANE = ("ingress", "scheduler", "kvcache")
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def in_process(batch: int, tokens: int, stages: int, cores: list[int] | None = None) -> dict:
    mask = os.sched_getaffinity(0)
    if cores is not None:
        os.sched_setaffinity(0, cores)
    try:
        return _in_process(batch, tokens, stages)
    finally:
        os.sched_setaffinity(0, mask)


def _in_process(batch: int, tokens: int, stages: int) -> dict:
    torch.set_num_threads(1)
    blocks = -(-(PROMPT_LEN + tokens + 1) // 16)  # per job
    engine = OfflineEngine.build("tiny", num_stages=stages, num_blocks=batch * blocks)
    jobs = []
    for i in range(batch):
        job = _Job(i, [(7 * i + k) % 256 for k in range(PROMPT_LEN)], PROMPT_LEN, SamplingParams(max_tokens=tokens + 1))
        job.blocks = list(range(i * blocks, (i + 1) * blocks))
        jobs.append(job)
    for job, token in zip(jobs, engine.step(jobs)):  # prefill
        job.tokens.append(token)
    steps = []
    for _ in range(tokens):
        start = time.perf_counter()
        for job, token in zip(jobs, engine.step(jobs)):
            job.tokens.append(token)
        steps.append(time.perf_counter() - start)
    total = sum(steps)
    return {"tokens_per_s": batch * tokens / total, "step_ms_p50": percentile(steps, 0.5) * 1e3,
            "step_ms_p99": percentile(steps, 0.99) * 1e3}


async def through_stack(endpoint: str, batch: int, tokens: int, pids: dict[str, int]) -> dict:
    from common.client import AsyncClient

    async with AsyncClient(endpoint, timeout=600) as client:
        await client.generate(prompt_ids=[1, 2, 3], max_tokens=4)  # warm-up

        async def one(i: int) -> list[float]:
            stamps = []
            prompt = [(7 * i + k) % 256 for k in range(PROMPT_LEN)]
            async for event in client.stream(prompt_ids=prompt, max_tokens=tokens + 1, ignore_eos=True):
                now = time.perf_counter()
                stamps += [now] * len(getattr(event, "token_ids", None) or [])
            return stamps

        before = await client.stats()
        cpu_before = {role: cpu_seconds(pid) for role, pid in pids.items()}
        all_stamps = await asyncio.gather(*(one(i) for i in range(batch)))
        cpu_after = {role: cpu_seconds(pid) for role, pid in pids.items()}
        after = await client.stats()
    first = max(s[0] for s in all_stamps)
    last = max(s[-1] for s in all_stamps)
    decoded = sum(sum(1 for t in s if t > first) for s in all_stamps)
    gaps = [b - a for s in all_stamps for a, b in zip(s[1:], s[2:])]
    iterations = after["iterations"] - before["iterations"]
    compute_ms = (after["compute_s"] - before["compute_s"]) / max(iterations, 1) * 1e3
    cpu_us = {role: (cpu_after[role] - cpu_before[role]) / max(iterations, 1) * 1e6 for role in pids}
    return {"tokens_per_s": decoded / (last - first), "gap_ms_p50": percentile(gaps, 0.5) * 1e3,
            "gap_ms_p99": percentile(gaps, 0.99) * 1e3, "iterations": iterations,
            "worker_compute_ms_per_iteration": compute_ms, "cpu_us_per_iteration": cpu_us}


def stack_run(batch: int, tokens: int, stages: int, control_cpus: int, extra: list[str]) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
    from stack import Stack

    mask = os.sched_getaffinity(0)
    stack = Stack(["scheduler.policy=fcfs", "cache.swap=defer", f"scheduler.max_jobs={batch}", "ingress.kv_overcommit=0",
                   "parallel.cpu_threads=1", f"parallel.control_cpus={control_cpus}", *extra],
                  num_stages=stages)  # every job is admitted, whatever --tokens asks
    try:
        pids = {role: stack.pids_of(role)[0] for role in CONTROL_PLANE}
        pids["client"] = os.getpid()
        if control_cpus:  # the stack started from the whole mask; the load comes from the control cores
            os.sched_setaffinity(0, sorted(mask)[:control_cpus])
        return asyncio.run(through_stack(stack.endpoint, batch, tokens, pids))
    finally:
        os.sched_setaffinity(0, mask)
        stack.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="8,32")
    parser.add_argument("--tokens", type=int, default=128, help="decode tokens per job")
    parser.add_argument("--repeats", type=int, default=3, help="stack runs per batch size, in-process runs around each")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--control-cpus", type=int, default=0, help="parallel.control_cpus of the stack (0: unpinned)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="stack config override")
    parser.add_argument("--out", default="bench/results/overhead.json")
    args = parser.parse_args(argv)
    mask = sorted(os.sched_getaffinity(0))
    control = args.control_cpus
    cores = None
    if control:
        from common.affinity import cores_for
        from common.config import ParallelConfig

        cores = cores_for(ParallelConfig(num_stages=args.stages, control_cpus=control), "worker", 0, mask)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        # in-process, stack, in-process, stack, ..., in-process: each stack run against the mean of
        # the in-process runs either side of it, and the row is the repeat with the median ratio
        local_runs = [in_process(batch, args.tokens, args.stages, cores)]
        repeats = []
        for _ in range(args.repeats):
            stack = stack_run(batch, args.tokens, args.stages, control, args.set)
            local_runs.append(in_process(batch, args.tokens, args.stages, cores))
            first, second = local_runs[-2:]
            local = {k: (first[k] + second[k]) / 2 for k in first}
            repeats.append({
                "in_process": local,
                "stack": stack,
                "throughput_ratio": stack["tokens_per_s"] / local["tokens_per_s"],
                "added_ms_p50": stack["gap_ms_p50"] - local["step_ms_p50"],
                "added_ms_p99": stack["gap_ms_p99"] - local["step_ms_p99"],
                # what the stack adds around its own model step (drift-free: measured in the same run)
                "added_over_stack_compute_ms_p50": stack["gap_ms_p50"] - stack["worker_compute_ms_per_iteration"],
            })
        ratios = sorted(r["throughput_ratio"] for r in repeats)
        row = {"batch": batch, **next(r for r in repeats if r["throughput_ratio"] == ratios[len(ratios) // 2]),
               "throughput_ratios": [r["throughput_ratio"] for r in repeats],
               "cpu_us_per_iteration_median": {role: statistics.median(r["stack"]["cpu_us_per_iteration"][role] for r in repeats)
                                               for role in repeats[0]["stack"]["cpu_us_per_iteration"]},
               "in_process_tokens_per_s": [r["tokens_per_s"] for r in local_runs], "repeats": repeats}
        rows.append(row)
        local, stack = row["in_process"], row["stack"]
        print(f"batch {batch:>3}: in-process {local['tokens_per_s']:8.0f} tok/s ({local['step_ms_p50']:.2f} ms/step)  "
              f"stack {stack['tokens_per_s']:8.0f} tok/s ({stack['gap_ms_p50']:.2f} ms/iter)  "
              f"ratio {row['throughput_ratio']:.3f} (all {', '.join(f'{r:.3f}' for r in row['throughput_ratios'])})  "
              f"added p50 {row['added_ms_p50'] * 1e3:.0f} us p99 {row['added_ms_p99'] * 1e3:.0f} us, "
              f"over the stack's compute p50 {row['added_over_stack_compute_ms_p50'] * 1e3:.0f} us; "
              "median CPU us/iter " + " ".join(f"{r} {v:.0f}" for r, v in row["cpu_us_per_iteration_median"].items()),
              flush=True)
    result = {"model": "tiny", "stages": args.stages, "repeats": args.repeats, "decode_tokens_per_job": args.tokens, "overrides": args.set,
              "torch_threads_in_process": 1, "torch_threads_per_worker": 1, "control_cpus": control,
              "machine_cores": len(mask), "in_process_cores": cores, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
