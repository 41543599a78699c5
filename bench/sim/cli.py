"""`fastserve sim`: simulate a workload under one or more policies and print a summary per policy."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench import workloads
from bench.costmodel import GPUS, MODELS, CostModel, ProfileCost, roofline
from bench.metrics import SLO
from bench.sim.memory import UnlimitedMemory
from bench.sim.runner import run_policies
from common import config as config_mod
from common.config import POLICIES, ConfigError
from common.profile import Profile, ProfileError


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fastserve sim", description=__doc__)
    p.add_argument("--config", help="TOML config file (the [scheduler] section is used)")
    p.add_argument("-o", "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    p.add_argument("--policies", help=f"comma-separated, any of {','.join(POLICIES)}; default: scheduler.policy")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--out", help="also write the JSON object to this file")
    w = p.add_argument_group("workload")
    w.add_argument("--trace", help=f"replay a trace: {', '.join(workloads.TRACES)} or a CSV path; default synthetic")
    w.add_argument("--traces-dir", default=str(workloads.DEFAULT_TRACES))
    w.add_argument("--limit", type=int, default=0, help="trace rows to replay (0 = all)")
    w.add_argument("--num", type=int, default=1000, help="synthetic requests")
    w.add_argument("--rate", type=float, help="arrivals per second (trace: scale time to this rate)")
    w.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of Gamma inter-arrivals")
    w.add_argument("--input-zipf", default="1.1,16,2048", help="EXPONENT,LOW,HIGH of input lengths")
    w.add_argument("--output-zipf", default="1.1,1,2048", help="EXPONENT,LOW,HIGH of output lengths")
    w.add_argument("--max-context", type=int, default=0, help="clip prompt+output to this many tokens (0 = no clip)")
    w.add_argument("--seed", type=int, default=0)
    c = p.add_argument_group("cost model")
    c.add_argument("--profile", help="profile JSON from `fastserve profile` (instead of a roofline)")
    c.add_argument("--gpu", default="A100-40GB", choices=sorted(GPUS))
    c.add_argument("--model", default="gpt3-175b", choices=sorted(MODELS))
    c.add_argument("--tp", type=int, default=8, help="tensor-parallel degree")
    c.add_argument("--pp", type=int, default=2, help="pipeline stages")
    c.add_argument("--memory", default="unlimited", choices=["unlimited", "kv"], help="KV memory model")
    s = p.add_argument_group("SLO for goodput")
    s.add_argument("--slo-ttft", type=float, default=float("inf"), help="seconds")
    s.add_argument("--slo-tpot", type=float, default=float("inf"), help="seconds")
    return p.parse_args(argv)


def _zipf(text: str) -> tuple[float, int, int]:
    try:
        a, lo, hi = text.split(",")
        return float(a), int(lo), int(hi)
    except ValueError:
        raise ValueError(f"Zipf parameters must look like EXPONENT,LOW,HIGH (e.g. 1.1,1,2048), got {text!r}") from None


def build_workload(args: argparse.Namespace) -> workloads.Workload:
    if args.trace:
        return workloads.trace(args.trace, args.rate, args.max_context, args.limit, args.traces_dir)
    if args.rate is None:
        raise ValueError("a synthetic workload needs --rate (arrivals per second)")
    return workloads.synthetic(
        args.num, args.rate, args.cv, _zipf(args.input_zipf), _zipf(args.output_zipf), args.max_context, args.seed
    )


def build_cost(args: argparse.Namespace, cfg: config_mod.Config) -> CostModel:
    if args.profile:
        return ProfileCost(Profile.load(args.profile), num_stages=cfg.parallel.num_stages)
    return roofline(args.gpu, args.model, args.tp, args.pp)


def build_memory(args: argparse.Namespace, cfg: config_mod.Config, cost: CostModel):
    if args.memory == "unlimited":
        return UnlimitedMemory
    from bench.sim.kv import kv_memory_factory

    return kv_memory_factory(cfg.cache, cfg.scheduler, cost)


def table(result: dict[str, Any]) -> str:
    head = f"{'policy':<16}{'JCT mean':>10}{'p50':>9}{'p99':>10}{'TTFT mean':>11}{'TPOT p50':>10}{'preempt':>9}{'req/s':>8}"
    lines = [head]
    for name, r in result["policies"].items():
        j, f = r["jct_s"], r["ttft_s"]
        lines.append(
            f"{name:<16}{j['mean']:>10.2f}{j['p50']:>9.2f}{j['p99']:>10.2f}{f['mean']:>11.2f}"
            f"{r['tpot_s']['p50']:>10.3f}{r['preemptions']['mean']:>9.1f}{r['throughput_rps']:>8.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        # the model is the cost model's (a profile or a roofline), never loaded: the tiny one keeps the config
        # from converting the default model for nothing
        cfg = config_mod.load(args.config, args.set, ("model.path=tiny",))
        policies = args.policies.split(",") if args.policies else [cfg.scheduler.policy]
        unknown = [p for p in policies if p not in POLICIES]
        if unknown:
            raise ValueError(f"unknown policy {', '.join(unknown)}; use any of {', '.join(POLICIES)}")
        workload = build_workload(args)
        cost = build_cost(args, cfg)
        memory = build_memory(args, cfg, cost)
    except (ConfigError, ProfileError, ValueError, FileNotFoundError) as e:
        print(f"fastserve sim: {e}", file=sys.stderr)
        return 2
    slo = SLO(ttft_s=args.slo_ttft, tpot_s=args.slo_tpot)
    result = {
        "workload": workload.describe(),
        "cost": cost.describe(),
        "memory": args.memory,
        "scheduler": cfg.to_dict()["scheduler"],
        "policies": run_policies(workload, cost, cfg.scheduler, policies, memory, slo),
    }
    text = json.dumps(result, indent=1, default=float)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text if args.json else table(result))
    return 0
