"""KV swapping under memory pressure: proactive, reactive, recompute and defer with skip-join MLFQ.

    python -m bench.kv_swap real [--num 120] [--rate 6] [--blocks 48]     # the 2-stage CPU stack
    python -m bench.kv_swap sim  [--num 2000]                               # GPT-3 175B at paper scale

Real: the tiny model, a device pool of `--blocks` blocks per stage (a fraction of what the
workload's live jobs hold), the same Zipf/Gamma workload and seed for every mode, one stack per mode
in one run. Reports average and p99 JCT, the ratios against proactive, swaps and the fraction of copy
time hidden behind computation (from the stage workers' copy executors, via the stats message).
Sim: the same planner classes in the simulator with the GPT-3 175B roofline on 16 A100-40GB (tensor
parallel 8 inside a node, pipeline 2 across nodes), the KV memory model, and host-device bandwidth
from the cost model; use a rate near saturation (4 requests/s) so that the KV pool is the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

MODES = ("proactive", "reactive", "recompute", "defer")


async def run_mode(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    from bench.loadtest.driver import run_load
    from bench.loadtest.launch import launched
    from bench.loadtest.plan import WorkloadSpec, make_plan
    from bench.loadtest.report import summarize_outcomes
    from common import config as config_mod
    from common.client import AsyncClient

    config = config_mod.load(None, [
        "model.path=tiny", "scheduler.policy=skip-join-mlfq", f"cache.swap={mode}", f"cache.num_gpu_blocks={args.blocks}",
        "cache.headroom_blocks=4", "cache.num_host_blocks=4096", f"scheduler.max_jobs={args.max_jobs}",
        f"scheduler.base_quantum_s={args.quantum}", "ingress.kv_overcommit=0",  # the modes meet the whole burst
    ])
    spec = WorkloadSpec(num=args.num, rate=args.rate, cv=2.0, input_zipf=(1.1, 16, 256), output_zipf=(1.1, 1, 256),
                        max_context=512, seed=args.seed)
    plan = make_plan(spec.build(), warmup=0, seed=args.seed)
    async with launched(config) as stack:
        outcomes = await stack.guard(run_load(stack.endpoint, plan, timeout=900))
        async with AsyncClient(stack.endpoint, timeout=30) as client:
            stats = await client.stats()
    summary = summarize_outcomes(outcomes)
    copy_s, overlap_s = stats.get("copy_s", 0.0), stats.get("copy_overlap_s", 0.0)
    return {
        "mode": mode,
        "summary": summary,
        "swaps_out": stats.get("swaps_out", 0),
        "swaps_in": stats.get("swaps_in", 0),
        "dropped": stats.get("dropped", 0),
        "held": stats.get("held", 0),
        "copy_s": copy_s,
        "copy_overlap_s": overlap_s,
        "copy_hidden_fraction": overlap_s / copy_s if copy_s else None,
        "errors": sum(1 for o in outcomes if o.error),
        "config": config.to_dict(),
    }


def jct(run: dict[str, Any], stat: str) -> float:
    return run["summary"]["jct_s"][stat]


def table(runs: list[dict[str, Any]]) -> str:
    base = next(r for r in runs if r["mode"] == "proactive")
    lines = ["| mode | avg JCT (s) | p99 JCT (s) | avg vs proactive | p99 vs proactive | swaps out/in | dropped | copy hidden |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in runs:
        hidden = "-" if r.get("copy_hidden_fraction") is None else f"{r['copy_hidden_fraction']:.0%}"
        lines.append(f"| {r['mode']} | {jct(r, 'mean'):.2f} | {jct(r, 'p99'):.2f} | {jct(r, 'mean') / jct(base, 'mean'):.2f}x | "
                     f"{jct(r, 'p99') / jct(base, 'p99'):.2f}x | {r.get('swaps_out', 0)}/{r.get('swaps_in', 0)} | "
                     f"{r.get('dropped', 0)} | {hidden} |")
    return "\n".join(lines)


def real(args: argparse.Namespace) -> dict[str, Any]:
    runs = []
    for mode in MODES:
        run = asyncio.run(run_mode(mode, args))
        print(f"{mode:>10}: avg JCT {jct(run, 'mean'):.2f} s  p99 {jct(run, 'p99'):.2f} s  swaps "
              f"{run['swaps_out']}/{run['swaps_in']}  dropped {run['dropped']}  errors {run['errors']}", flush=True)
        runs.append(run)
    return {"what": "2-stage CPU stack, tiny model, skip-join-mlfq", "num": args.num, "rate": args.rate,
            "cv": 2.0, "device_blocks_per_stage": args.blocks, "block_size": 16, "seed": args.seed, "runs": runs}


def sim(args: argparse.Namespace) -> dict[str, Any]:
    runs = []
    # "proactive-skip": proactive as it was before upload_wait (a picked job whose upload is in
    # flight skips the iteration instead of making the compute wait for the copy)
    for mode in (*MODES, "proactive-skip"):
        swap = "proactive" if mode == "proactive-skip" else mode
        cmd = [sys.executable, "-m", "services.cli", "sim", "--json", "--policies", "skip-join-mlfq",
               "--gpu", "A100-40GB", "--model", "gpt3-175b", "--tp", "8", "--pp", "2", "--memory", "kv",
               "--num", str(args.num), "--rate", str(args.rate), "--cv", "2", "--seed", str(args.seed),
               "--set", f"cache.swap={swap}", "--set", f"cache.upload_wait={'false' if mode == 'proactive-skip' else 'true'}"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        result = json.loads(out.stdout)
        summary = result["policies"]["skip-join-mlfq"]
        sim_stats = summary.get("sim", {})
        runs.append({"mode": mode, "summary": summary, "command": "fastserve " + " ".join(cmd[3:]),
                     "swaps_out": sim_stats.get("swaps_out", 0), "swaps_in": sim_stats.get("swaps_in", 0),
                     "dropped": sim_stats.get("dropped", 0), "copy_s": sim_stats.get("copy_s", 0.0)})
        print(f"{mode:>10}: avg JCT {jct(runs[-1], 'mean'):.2f} s  p99 {jct(runs[-1], 'p99'):.2f} s", flush=True)
    return {"what": "simulator, GPT-3 175B, 16 x A100-40GB (TP 8 x PP 2), skip-join-mlfq", "num": args.num,
            "rate": args.rate, "cv": 2.0, "seed": args.seed, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kv_swap", description=__doc__.splitlines()[0])
    parser.add_argument("where", choices=("real", "sim"))
    parser.add_argument("--num", type=int, default=120)
    parser.add_argument("--rate", type=float, default=6.0, help="arrivals per second")
    parser.add_argument("--blocks", type=int, default=48, help="device blocks per stage (real)")
    parser.add_argument("--max-jobs", type=int, default=8)
    parser.add_argument("--quantum", type=float, default=0.005, help="base quantum, seconds (real)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    result = real(args) if args.where == "real" else sim(args)
    print()
    print(table(result["runs"]))
    out = Path(args.out or f"bench/results/kv_swap{'' if args.where == 'real' else '_sim'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
