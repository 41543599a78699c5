"""`fastserve loadtest`: parse options, run the load against a stack (or one launched per policy), write results."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

from bench import workloads
from bench.loadtest import plan as plan_mod
from bench.loadtest import serve_metrics as serve
from bench.loadtest.driver import Outcome, run_load, zmq_backend
from bench.loadtest.launch import StackFailed, launched
from bench.loadtest.plots import plot_jct_cdf, plot_latency_vs_rate
from bench.loadtest.report import format_table, jct_values, measured_rate, ratios, saturation, summarize_outcomes
from common import config as config_mod
from common.config import POLICIES
from common.curve import client_keys

# Launched stacks compare the scheduling policies, so they serve the tiny model (its iterations cost
# milliseconds, the queueing is the scheduler's) unless --config or --set names another. The queue is what
# the policies order, so ingress admits every request (no memory-aware bound, ingress.kv_overcommit=0):
# a burst past what the pools hold waits in the scheduler instead of being answered `overloaded`.
LAUNCH_DEFAULTS = ("model.path=tiny", "ingress.kv_overcommit=0")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastserve loadtest", description="open-loop load test of a running or launched stack")
    t = p.add_argument_group("target")
    t.add_argument("--backend", choices=("zmq", "openai"), default="zmq",
                   help="zmq: the FastServe client library; openai: streamed POST /v1/completions over HTTP")
    t.add_argument("--address", help="zmq: client endpoint of a running stack (tcp://HOST:PORT)")
    t.add_argument("--base-url", help="openai: base URL of a running OpenAI-compatible server (http://HOST:PORT)")
    t.add_argument("--model", default="", help="openai: the model name to send (default: the first /v1/models lists)")
    t.add_argument("--launch", action="store_true", help="start a stack per policy from --config, stop it after "
                   "(on the tiny model unless the config or --set names one)")
    t.add_argument("--policies", help=f"with --launch: comma-separated, any of {','.join(POLICIES)}")
    t.add_argument("--config", help="TOML config of the launched stack (also gives the model context)")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    w = p.add_argument_group("workload")
    w.add_argument("--trace", default="", help=f"replay a trace: {', '.join(workloads.TRACES)} or a CSV path")
    w.add_argument("--traces-dir", default=str(workloads.DEFAULT_TRACES))
    w.add_argument("--num", type=int, default=100, help="requests (trace: first NUM rows; 0 = all)")
    w.add_argument("--rate", type=float, help="arrivals per second (trace: time scaled to this mean rate)")
    w.add_argument("--rates", help="comma-separated rates to sweep (each a separate run)")
    w.add_argument("--cv", type=float, default=1.0, help="CV of the Gamma inter-arrival gaps (1 = Poisson)")
    w.add_argument("--input-zipf", default="1.1,16,2048", help="EXPONENT,LOW,HIGH of input lengths")
    w.add_argument("--output-zipf", default="1.1,1,2048", help="EXPONENT,LOW,HIGH of output lengths")
    w.add_argument("--max-context", type=int, default=0, help="clip prompt+output (0 = the model's context)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--saturation", action="store_true", help="send every request at once; throughput = capacity")
    r = p.add_argument_group("run")
    r.add_argument("--warmup", type=int, default=0, help="first N requests are sent but not measured")
    r.add_argument("--concurrency", type=int, default=0, help="cap on requests in flight (0 = none)")
    r.add_argument("--timeout", type=float, default=600.0, help="seconds per request before it is cancelled")
    r.add_argument("--slo", default="", help="goodput SLO, e.g. ttft=0.5,tpot=0.05 (seconds)")
    r.add_argument("--goodput", nargs="+", default=[], metavar="KEY:MS",
                   help="vLLM's goodput SLOs, e.g. ttft:500 tpot:50 e2el:2000 (milliseconds)")
    r.add_argument("--percentiles", "--metric-percentiles", default="99",
                   help="comma-separated percentiles of the vLLM metrics (vLLM's --metric-percentiles)")
    r.add_argument("--percentile-metrics", default=",".join(serve.DEFAULT_PERCENTILE_METRICS),
                   help=f"comma-separated, any of {','.join(serve.METRICS)}")
    r.add_argument("--out", help="results JSON file")
    r.add_argument("--plots", help="PNG path prefix, e.g. docs/img/loadtest_zipf")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def workload_spec(args: argparse.Namespace, config: config_mod.Config) -> plan_mod.WorkloadSpec:
    from common.model.spec import load_spec

    context = args.max_context or config.model.max_context or load_spec(config.model.path).max_context
    if args.num < 0 or (not args.trace and args.num == 0):
        raise ValueError("--num must be > 0 for a synthetic workload (>= 0 for a trace)")
    return plan_mod.WorkloadSpec(args.num, None, args.cv, plan_mod.parse_zipf(args.input_zipf),
                                 plan_mod.parse_zipf(args.output_zipf), args.trace, args.traces_dir, context, args.seed)


def rates_of(args: argparse.Namespace) -> list[float | None]:
    if args.rates:
        return list(plan_mod.parse_rates(args.rates))
    if args.rate is not None:
        return plan_mod.parse_rates(str(args.rate))
    if args.saturation or args.trace:
        return [None]  # a burst, or the trace's recorded rate
    raise ValueError("give --rate or --rates (or --trace to replay at the recorded rate, or --saturation)")


def backend_of(args: argparse.Namespace, config: config_mod.Config) -> Any:
    if args.backend == "openai":
        from bench.loadtest.openai_backend import openai_backend

        return openai_backend(args.model)
    return functools.partial(zmq_backend, keys=client_keys(config.security))  # None: a stack without CURVE


def serve_options(args: argparse.Namespace) -> dict[str, Any]:
    """--percentiles, --percentile-metrics and --goodput, checked."""
    try:
        percentiles = [float(p) for p in serve.parse_list(args.percentiles)]
    except ValueError:
        raise ValueError(f"--percentiles {args.percentiles!r}: give numbers such as 50,90,99") from None
    if not all(0 < p < 100 for p in percentiles):
        raise ValueError("--percentiles must lie strictly between 0 and 100")
    return {"percentiles": percentiles, "percentile_metrics": serve.parse_list(args.percentile_metrics, serve.METRICS),
            "goodput": serve.parse_goodput(args.goodput)}


async def one_run(address: str, label: str, spec: plan_mod.WorkloadSpec, args: argparse.Namespace,
                  slo: Any, batch_jobs: int, backend: Any) -> dict[str, Any]:
    workload = spec.build() if spec.rate is not None or spec.trace else spec.at_rate(1.0).build()
    sends = plan_mod.make_plan(workload, args.warmup, args.seed, burst=args.saturation)
    load_before = os.getloadavg()  # other work on the machine skews latencies; recorded with the run
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(sends), desc=label, unit="req", file=sys.stderr, leave=False)
    try:
        outcomes = await run_load(address, sends, args.concurrency, args.timeout,
                                  on_done=(lambda _: bar.update()) if bar else None, backend=backend)
    finally:
        if bar is not None:
            bar.close()
    summary = summarize_outcomes(outcomes, slo)
    if args.saturation:
        summary["saturation"] = saturation(outcomes, batch_jobs)
    options = serve_options(args)
    return {"rate": spec.rate, "measured_rate": measured_rate(outcomes), "backend": args.backend, "target": address,
            "workload": workload.describe(), "summary": summary, "serve": serve.serve_metrics(outcomes, **options),
            "loadavg_1m": {"before": load_before[0], "after": os.getloadavg()[0]},
            "records": [dataclasses.asdict(o) for o in outcomes]}


async def run_all(args: argparse.Namespace, config: config_mod.Config) -> dict[str, Any]:
    spec, rates, slo = workload_spec(args, config), rates_of(args), plan_mod.parse_slo(args.slo)
    serve_options(args)  # refused before any stack starts
    http = args.backend == "openai"
    backend = backend_of(args, config)
    runs: list[dict[str, Any]] = []
    if args.launch:
        for policy in policy_list(args, config):
            async with launched(config.replace(scheduler={"policy": policy}), http=http) as stack:
                target = stack.base_url if http else stack.endpoint
                for rate in rates:
                    run = await stack.guard(one_run(target, f"{policy} @ {rate}", spec.at_rate(rate), args, slo,
                                                     config.scheduler.max_jobs, backend))
                    runs.append({"policy": policy, "endpoints": stack.config.to_dict()["endpoints"], **run})
    else:
        for rate in rates:
            target = args.base_url if http else args.address
            run = await one_run(target, f"@ {rate}", spec.at_rate(rate), args, slo, config.scheduler.max_jobs, backend)
            runs.append({"policy": config.scheduler.policy if args.config else "running", **run})
    return {"command": ["fastserve", "loadtest", *args.argv], "config": config.to_dict(),
            "workload": dataclasses.asdict(spec), "slo": args.slo, "saturation": args.saturation,
            "warmup": args.warmup, "concurrency": args.concurrency, "runs": runs, "ratios": ratios_by_rate(runs)}


def policy_list(args: argparse.Namespace, config: config_mod.Config) -> list[str]:
    names = [p.strip() for p in (args.policies or config.scheduler.policy).split(",") if p.strip()]
    bad = [p for p in names if p not in POLICIES]
    if bad or not names:
        raise ValueError(f"unknown policy {', '.join(bad) or '(none)'}; use any of {', '.join(POLICIES)}")
    return names


def by_rate(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """rate label -> policy -> run."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for run in runs:
        out.setdefault(str(run["rate"]), {})[run["policy"]] = run
    return out


def ratios_by_rate(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    return {rate: ratios({p: r["summary"] for p, r in group.items()}) for rate, group in by_rate(runs).items()}


def report(result: dict[str, Any], args: argparse.Namespace) -> None:
    options = serve_options(args)
    for rate, group in by_rate(result["runs"]).items():
        measured = ", ".join(f"{p} {_rate(r['measured_rate'])}" for p, r in group.items())
        asked = "a burst (saturation)" if args.saturation else ("the trace's" if rate == "None" else f"{rate} req/s")
        print(f"\n== arrival rate measured: {measured} (asked: {asked})")
        print(format_table({p: r["summary"] for p, r in group.items()}))
        for policy, run in group.items():
            print(f"\n{policy}, {run['backend']} backend:")
            print(serve.format_serve_metrics(run["serve"], options["percentiles"], options["percentile_metrics"]))
        for policy, run in group.items():
            if "saturation" in run["summary"]:
                sat = run["summary"]["saturation"]
                print(f"saturation ({policy}): {sat['requests_per_s']:.3f} req/s = {sat['tokens_per_s']:.1f} tok/s "
                      f"while the batch could be full (first {sat['busy_until_s']:.1f} s), "
                      f"mean output {sat['mean_output_tokens']:.1f} tokens")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"\nresults: {args.out}")
    if args.plots:
        for rate, group in by_rate(result["runs"]).items():
            cdf = {p: jct_values([Outcome(**o) for o in r["records"]]) for p, r in group.items()}
            print("plot:", plot_jct_cdf(cdf, f"{args.plots}_jct_cdf_r{rate}.png", f"JCT CDF at {rate} req/s"))
        if len(by_rate(result["runs"])) > 1:
            items = [{"rate": r["rate"], "policy": r["policy"], "summary": r["summary"]} for r in result["runs"]]
            print("plot:", plot_latency_vs_rate(items, f"{args.plots}_latency_vs_rate.png"))


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} req/s"


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(argv)
    target, flag = (args.base_url, "--base-url") if args.backend == "openai" else (args.address, "--address")
    other = args.address if args.backend == "openai" else args.base_url
    if bool(args.launch) == bool(target) or other:
        print(f"fastserve loadtest: give exactly one of {flag} (a running {'server' if args.backend == 'openai' else 'stack'})"
              f" and --launch; --address is for --backend zmq, --base-url for --backend openai", file=sys.stderr)
        return 2
    if args.policies and not args.launch:
        print("fastserve loadtest: --policies needs --launch (one stack per policy)", file=sys.stderr)
        return 2
    try:
        config = config_mod.load(args.config, args.set, LAUNCH_DEFAULTS if args.launch else ())
        import uvloop

        result = uvloop.run(run_all(args, config))
    except (ValueError, FileNotFoundError, StackFailed) as e:  # ConfigError is a ValueError
        print(f"fastserve loadtest: {e}", file=sys.stderr)
        return 2 if not isinstance(e, StackFailed) else 1
    report(result, args)
    return 0
