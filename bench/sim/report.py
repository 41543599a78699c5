"""Markdown tables for docs/benchmarks.md from bench/results/sim_*.json.

    python -m bench.sim.report
"""

from __future__ import annotations

import json
from pathlib import Path

from common.config import POLICIES

RESULTS = Path("bench/results")


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def paper_table(data: dict) -> str:
    head = ["Zipf", "CV", "rate", "util"] + [f"{p} mean / p99" for p in POLICIES]
    head += ["FCFS÷SJ mean", "FCFS÷SJ p99", "ORCA÷SJ mean", "ORCA÷SJ p99", "SJ÷SRPT mean"]
    lines = [_row(head), _row(["---"] * len(head))]
    for p in data["points"]:
        r = p["policies"]
        jct = {n: r[n]["jct_s"] for n in POLICIES}
        sj, fc, orca, sr = jct["skip-join-mlfq"], jct["fcfs"], jct["orca"], jct["srpt-oracle"]
        lines.append(_row([
            f"{p.get('zipf', 1.1):g}", f"{p['cv']:g}", f"{p['rate']:g}", f"{p.get('stage_utilization_fcfs', 0):.2f}",
            *[f"{jct[n]['mean']:.1f} / {jct[n]['p99']:.0f}" for n in POLICIES],
            f"{fc['mean'] / sj['mean']:.2f}", f"{fc['p99'] / sj['p99']:.2f}",
            f"{orca['mean'] / sj['mean']:.2f}", f"{orca['p99'] / sj['p99']:.2f}", f"{sj['mean'] / sr['mean']:.2f}",
        ]))
    return "\n".join(lines)


def ratio_table(data: dict, baseline: str) -> str:
    """baseline's mean and p99 JCT divided by each policy's: how many times lower each policy's is."""
    names = [n for n in POLICIES if n != baseline]
    head = ["point"] + [f"{baseline}÷{n} mean / p99" for n in names]
    lines = [_row(head), _row(["---"] * len(head))]
    for p in data["points"]:
        r = p["policies"]
        base = r[baseline]["jct_s"]
        where = p["trace"] if "trace" in p else f"Zipf {p.get('zipf', 1.1):g} CV {p['cv']:g}"
        lines.append(_row([f"{where} @ {p['rate']:g}/s"] + [
            f"{base['mean'] / r[n]['jct_s']['mean']:.2f} / {base['p99'] / r[n]['jct_s']['p99']:.2f}" for n in names
        ]))
    return "\n".join(lines)


def traces_table(data: dict) -> str:
    head = ["trace", "rate", "clipped"] + [f"{p} mean / p99" for p in POLICIES]
    lines = [_row(head), _row(["---"] * len(head))]
    for p in data["points"]:
        r = p["policies"]
        lines.append(_row([
            p["trace"], f"{p['rate']:g}", p["workload"]["clipped"],
            *[f"{r[n]['jct_s']['mean']:.2f} / {r[n]['jct_s']['p99']:.1f}" for n in POLICIES],
        ]))
    return "\n".join(lines)


def demote_table(data: dict) -> str:
    head = ["CV", "seed", "front mean / p99", "back mean / p99", "back÷front mean"]
    lines = [_row(head), _row(["---"] * len(head))]
    for p in data["points"]:
        f, b = p["front"]["jct_s"], p["back"]["jct_s"]
        lines.append(_row([f"{p['cv']:g}", p["seed"], f"{f['mean']:.2f} / {f['p99']:.0f}", f"{b['mean']:.2f} / {b['p99']:.0f}", f"{b['mean'] / f['mean']:.3f}"]))
    return "\n".join(lines)


def main() -> int:
    for name, fn in (("paper", paper_table), ("traces", traces_table), ("demote", demote_table)):
        path = RESULTS / f"sim_{name}.json"
        if path.is_file():
            print(f"### sim_{name}\n\n{fn(json.loads(path.read_text()))}\n")
            if name in ("paper", "traces"):
                for baseline in ("orca", "fcfs"):
                    print(f"### sim_{name}: ratios against {baseline}\n\n{ratio_table(json.loads(path.read_text()), baseline)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
