"""What the running stack adds to each iteration, measured through `fastserve up`, into a profile.

    python -m bench.stack_cost --profile P.json --out P_stack.json [--stages 2] [--batches 1,4,8,16,32]
                               [--tokens 64] [--prefill-lens 64,256,1024,2040] [--set KEY=VALUE ...]

For each batch size B, B decode requests of 16 prompt tokens run at once through a stack that uses
the profile P (so its policies see the same times). A job's gap between tokens is one trip of its
batch through the pipeline; the workers report the compute of every batch (all stages). What the
stack adds to an iteration of n jobs (n = tokens decoded / iterations: with S stages the B jobs run as
S disjoint batches) is the median gap minus what the profile says such an iteration computes (the
decode time of n jobs at their mean context): it holds the control plane and the hops, and also the
compute being slower inside the stack than alone (the processes share the cores). The workers' own
compute per iteration is recorded beside it.

Prefill: for each length L, lone requests of L prompt tokens and one output token, one after another on
the idle stack; each takes one iteration through the stack. What a prefill of L adds beyond the
per-iteration cost above is its median latency minus the profile's prefill time of L and minus the
added time of a 1-job iteration (the larger the prompt, the more activations cross the stages, and the
longer its compute runs beside the control plane).

The output is P with a "stack" section (`common/profile.py`) that the simulator adds to every
iteration it models, and the measurements themselves under "stack_measured".

    python -m bench.stack_cost --profile P.json --out P_stack.json --from-log ITERATIONS.jsonl [--policy NAME]

fits the same section instead (the log may be gzipped) from what a stack did under real load: the
batches it computed, as its scheduler recorded them (`scheduler.iteration_log`,
services/scheduler/iterlog.py), for example during `fastserve loadtest --launch --set
scheduler.iteration_log=FILE`. Each batch's time on the pipeline is what the simulator's model of it
would need to match: with S stages a batch holds each stage for T / S, so T / S is the lesser of its
time in the stack / S (from when it could start: sent, and the batches it carries tokens from back)
and the time since the batch before it came back. Decode-only batches give the added time by jobs
per batch (the mean of T minus the profile's decode time, in bins of batch size); batches with one
prefill give the added time by prompt length (the mean of what is left beyond that and the
profile's prefill).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import gzip
import json
import statistics
import sys
import time
from pathlib import Path

from bench.overhead import CONTROL_PLANE, through_stack
from common.profile import Profile


PROMPT_LEN = 16  # as bench.overhead sends


async def lone_prefills(endpoint: str, length: int, repeats: int) -> list[float]:
    """Seconds from send to the one output token of lone requests with `length` prompt tokens."""
    from common.client import AsyncClient

    seconds = []
    async with AsyncClient(endpoint, timeout=600) as client:
        for k in range(repeats + 1):  # the first warms this length up and is not counted
            prompt = [(11 * k + i) % 256 for i in range(length)]
            start = time.perf_counter()
            await client.generate(prompt_ids=prompt, max_tokens=1, ignore_eos=True)
            if k:
                seconds.append(time.perf_counter() - start)
    return seconds


def measure(profile: str, stages: int, batches: list[int], tokens: int, extra: list[str],
            prefill_lens: list[int] = (), repeats: int = 5) -> tuple[list[dict], list[dict]]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
    from stack import Stack

    model = Profile.load(profile)
    rows, prefills = [], []
    stack = Stack([f"scheduler.profile={Path(profile).resolve()}", *extra], num_stages=stages)
    try:
        pids = {role: stack.pids_of(role)[0] for role in CONTROL_PLANE}
        for batch in batches:
            run = asyncio.run(through_stack(stack.endpoint, batch, tokens, pids))
            jobs = batch * tokens / max(run["iterations"], 1)  # decode tokens per iteration
            profiled_ms = model.decode_time(max(1, round(jobs)), PROMPT_LEN + tokens / 2) * 1e3
            added_ms = run["gap_ms_p50"] - profiled_ms
            rows.append({"requests": batch, "jobs_per_iteration": jobs, "profiled_ms": profiled_ms,
                         "added_ms": added_ms, **run})
            print(f"{batch:>3} requests: {jobs:5.1f} jobs/iteration, gap p50 {run['gap_ms_p50']:.2f} ms, "
                  f"profiled {profiled_ms:.2f} ms, workers' compute {run['worker_compute_ms_per_iteration']:.2f} ms, "
                  f"added {added_ms:.2f} ms", flush=True)
        one_job_ms = next((r["added_ms"] for r in rows if round(r["jobs_per_iteration"]) <= 1), 0.0)
        for length in prefill_lens:
            latency_ms = statistics.median(asyncio.run(lone_prefills(stack.endpoint, length, repeats))) * 1e3
            profiled_ms = model.prefill_time(length) * 1e3
            added_ms = latency_ms - profiled_ms - one_job_ms
            prefills.append({"prompt_len": length, "latency_ms_p50": latency_ms, "profiled_ms": profiled_ms,
                             "added_ms": added_ms})
            print(f"prefill {length:>5}: latency p50 {latency_ms:.2f} ms, profiled {profiled_ms:.2f} ms, "
                  f"added beyond a 1-job iteration {added_ms:.2f} ms", flush=True)
    finally:
        stack.stop()
    return rows, prefills


# Bins of jobs per batch for the fit: [1, 2), [2, 3), [3, 4), [4, 6), [6, 8), [8, 11), [11, 16), ...
BATCH_EDGES = sorted({round(2 ** (k / 2)) for k in range(0, 21)})
PREFILL_EDGES = (1, 64, 256, 1024, 1 << 30)
MIN_SAMPLES = 10  # batches a bin needs to give a point


def read_log(path: str, policy: str = "") -> tuple[int, list[list[dict]]]:
    """The stage count and the batches of each scheduler run in an iteration log (of one policy, or all)."""
    runs, stages, keep = [], None, False
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        for line in f:
            rec = json.loads(line)
            if "header" in rec:
                keep = not policy or rec["policy"] == policy
                if keep:
                    if stages is not None and rec["stages"] != stages:
                        raise ValueError(f"{path} holds runs with {stages} and {rec['stages']} stages; fit one count")
                    stages = rec["stages"]
                    runs.append([])
            elif keep and runs:
                runs[-1].append(rec)
    if stages is None or not any(runs):
        raise ValueError(f"{path} holds no batches" + (f" of policy {policy}" if policy else ""))
    return stages, runs


def pipeline_seconds(batches: list[dict], stages: int) -> list[float]:
    """Each batch's whole-pipeline time T as the simulator models it (T / stages on each stage, one
    after another), for batches in the order they came back: T / stages is the lesser of its time in
    the stack from when it could start / stages and the time since the batch before it came back."""
    out, prev = [], None
    for b in batches:
        per_stage = (b["done"] - b.get("ready", b["sent"])) / stages
        if prev is not None:
            per_stage = min(per_stage, b["done"] - prev)
        out.append(stages * max(per_stage, 0.0))
        prev = b["done"]
    return out


def _bin(edges: tuple[int, ...] | list[int], x: int) -> int:
    return bisect.bisect_right(edges, x) - 1


def fit_log(profile: Profile, stages: int, runs: list[list[dict]]) -> tuple[list[dict], list[dict]]:
    """Rows and prefills as `measure` gives them, fitted from the batches of real runs."""
    decode: dict[int, list[tuple[int, float]]] = {}
    lone: list[tuple[int, int, float]] = []  # batches with one prefill: (prompt, jobs, T - profiled compute)
    for batches in runs:
        ordered = sorted(batches, key=lambda b: b["done"])
        for b, seconds in zip(ordered, pipeline_seconds(ordered, stages)):
            prefill = [n for n, c in zip(b["new"], b["ctx"]) if c == 0]
            contexts = [c for c in b["ctx"] if c > 0]
            added = seconds - profile.iteration_time(prefill, contexts)
            if not prefill:
                decode.setdefault(_bin(BATCH_EDGES, len(contexts)), []).append((len(contexts), added))
            elif len(prefill) == 1:
                lone.append((prefill[0], len(b["ctx"]), added))
    rows = []
    for k in sorted(decode):
        points = decode[k]
        if len(points) >= MIN_SAMPLES:
            rows.append({"jobs_per_iteration": statistics.fmean(n for n, _ in points), "batches": len(points),
                         "added_ms": 1e3 * statistics.fmean(a for _, a in points)})
    if not rows:
        raise ValueError(f"no bin of decode-only batches holds {MIN_SAMPLES} batches; record a longer run")
    base = with_stack(profile, stages, rows)
    by_len: dict[int, list[tuple[int, float]]] = {}
    for prompt, jobs, added in lone:
        by_len.setdefault(_bin(PREFILL_EDGES, prompt), []).append((prompt, added - base.overhead_time(jobs, stages)))
    prefills = [{"prompt_len": round(statistics.fmean(n for n, _ in points)), "batches": len(points),
                 "added_ms": 1e3 * statistics.fmean(a for _, a in points)}
                for _, points in sorted(by_len.items()) if len(points) >= MIN_SAMPLES]
    return rows, prefills


def with_stack(profile: Profile, stages: int, rows: list[dict], prefills: list[dict] = ()) -> Profile:
    """The profile with its stack section: added seconds by jobs per iteration (one point per size),
    and by prefill length."""
    points: dict[int, float] = {}
    for row in rows:
        points[max(1, round(row["jobs_per_iteration"]))] = max(row["added_ms"], 0.0) / 1e3
    sizes = sorted(points)
    by_len = {p["prompt_len"]: max(p["added_ms"], 0.0) / 1e3 for p in prefills}
    lens = sorted(by_len)
    return Profile(profile.prefill_len, profile.prefill_s, profile.decode_batch, profile.decode_context,
                   profile.decode_s, profile.meta, stages, tuple(sizes), tuple(points[n] for n in sizes),
                   tuple(lens), tuple(by_len[n] for n in lens))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stack_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", required=True, help="the profile the stack and the simulator use")
    parser.add_argument("--out", required=True, help="where the profile with its stack section goes")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--batches", default="1,4,8,16,32")
    parser.add_argument("--tokens", type=int, default=64, help="decode tokens per request")
    parser.add_argument("--prefill-lens", default="64,256,1024,2040", help="prompt lengths of the prefill measurement ('' = none)")
    parser.add_argument("--repeats", type=int, default=5, help="lone requests per prefill length")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="stack config override")
    parser.add_argument("--from-log", metavar="FILE", help="fit from a scheduler's iteration log instead of measuring")
    parser.add_argument("--policy", default="", help="with --from-log: only the runs of this policy")
    args = parser.parse_args(argv)
    base = Profile.load(args.profile)
    if args.from_log:
        try:
            stages, runs = read_log(args.from_log, args.policy)
            rows, prefills = fit_log(base, stages, runs)
        except (OSError, ValueError, KeyError) as e:
            print(f"stack_cost: {e}", file=sys.stderr)
            return 2
        for row in rows:
            print(f"{row['jobs_per_iteration']:5.1f} jobs/batch ({row['batches']} batches): added {row['added_ms']:.2f} ms")
        for p in prefills:
            print(f"prefill ~{p['prompt_len']:>5} ({p['batches']} batches): added {p['added_ms']:.2f} ms")
        out = with_stack(base, stages, rows, prefills).to_dict()
        out["stack_measured"] = {"from_log": args.from_log, "policy": args.policy, "batches": sum(map(len, runs)),
                                 "rows": rows, "prefills": prefills}
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
        return 0
    lens = [int(n) for n in args.prefill_lens.split(",") if n]
    rows, prefills = measure(args.profile, args.stages, [int(b) for b in args.batches.split(",")], args.tokens, args.set,
                             lens, args.repeats)
    out = with_stack(base, args.stages, rows, prefills).to_dict()
    out["stack_measured"] = {"overrides": args.set, "decode_tokens_per_request": args.tokens, "rows": rows,
                             "prefills": prefills}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
