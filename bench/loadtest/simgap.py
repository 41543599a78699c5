"""Real system against `fastserve sim` on the same workload: mean and p99 JCT per policy and their gap.

    python -m bench.loadtest.simgap LOADTEST_JSON SIM_JSON --rate R [--out FILE]

The load test's warm-up requests are measured here too, since the simulator reports every request.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.loadtest.driver import Outcome
from bench.loadtest.report import summarize_outcomes


def real_summaries(loadtest: dict[str, Any], rate: float) -> dict[str, dict[str, Any]]:
    """Per policy: the summary over every request of the run at `rate` (warm-up included)."""
    out = {}
    for run in loadtest["runs"]:
        if run["rate"] is not None and abs(run["rate"] - rate) < 1e-9:
            outcomes = [Outcome(**{**r, "warmup": False}) for r in run["records"]]
            out[run["policy"]] = summarize_outcomes(outcomes)
    if not out:
        raise ValueError(f"no run at rate {rate}; rates: {sorted({r['rate'] for r in loadtest['runs']})}")
    return out


def same_workload(loadtest: dict[str, Any], sim: dict[str, Any], rate: float) -> None:
    real_summaries(loadtest, rate)  # raises when no run is at this rate
    run = next(r for r in loadtest["runs"] if r["rate"] is not None and abs(r["rate"] - rate) < 1e-9)
    for key in ("num_requests", "input_mean", "output_mean", "span_s"):
        a, b = run["workload"][key], sim["workload"][key]
        if abs(a - b) > 1e-6 * max(1.0, abs(a)):
            raise ValueError(f"the two runs used different workloads: {key} {a} (load test) vs {b} (sim)")


def gaps(loadtest: dict[str, Any], sim: dict[str, Any], rate: float) -> dict[str, dict[str, float]]:
    same_workload(loadtest, sim, rate)
    real = real_summaries(loadtest, rate)
    out = {}
    for policy, r in real.items():
        s = sim["policies"].get(policy)
        if s is None:
            continue
        row = {}
        for stat in ("mean", "p99"):
            row[f"real_jct_{stat}"] = r["jct_s"][stat]
            row[f"sim_jct_{stat}"] = s["jct_s"][stat]
            row[f"gap_{stat}"] = s["jct_s"][stat] / r["jct_s"][stat] - 1  # > 0: the simulator is slower
        out[policy] = row
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="simgap", description=__doc__)
    p.add_argument("loadtest")
    p.add_argument("sim")
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--out")
    args = p.parse_args(argv)
    try:
        result = gaps(json.loads(Path(args.loadtest).read_text()), json.loads(Path(args.sim).read_text()), args.rate)
    except (ValueError, OSError, KeyError) as e:
        print(f"simgap: {e}", file=sys.stderr)
        return 2
    print(f"{'policy':<16}{'real mean':>10}{'sim mean':>10}{'gap':>8}{'real p99':>10}{'sim p99':>10}{'gap':>8}")
    for policy, g in result.items():
        print(f"{policy:<16}{g['real_jct_mean']:>10.2f}{g['sim_jct_mean']:>10.2f}{g['gap_mean']:>+8.1%}"
              f"{g['real_jct_p99']:>10.2f}{g['sim_jct_p99']:>10.2f}{g['gap_p99']:>+8.1%}")
    if args.out:
        Path(args.out).write_text(json.dumps({"rate": args.rate, "loadtest": args.loadtest, "sim": args.sim,
                                              "gaps": result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
