"""Markdown tables of load-test results (for docs/benchmarks.md).

    python -m bench.loadtest.tables bench/results/loadtest_zipf.json [more.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.loadtest.cli import by_rate


def markdown(result: dict[str, Any], saturation_rps: float | None = None) -> str:
    lines = []
    for rate, group in by_rate(result["runs"]).items():
        load = f" ({float(rate) / saturation_rps:.0%} of saturation)" if saturation_rps else ""
        lines += [f"**{float(rate):.3f} req/s{load}**", "",
                  "| policy | JCT mean (s) | p50 | p99 | TTFT mean | TPOT p50 | norm. mean (s/tok) | tok/s | goodput (req/s) "
                  "| mean JCT ×fcfs | p99 JCT ×fcfs |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        ratios = result["ratios"].get(rate, {})
        for policy, run in group.items():
            s, r = run["summary"], ratios.get(policy, {})
            lines.append(
                f"| {policy} | {s['jct_s']['mean']:.2f} | {s['jct_s']['p50']:.2f} | {s['jct_s']['p99']:.2f} "
                f"| {s['ttft_s']['mean']:.2f} | {s['tpot_s']['p50']:.3f} | {s['normalized_s']['mean']:.3f} "
                f"| {s['throughput_tps']:.1f} | {s.get('goodput_rps', 0.0):.3f} "
                f"| {r.get('jct_s.mean', float('nan')):.2f} | {r.get('jct_s.p99', float('nan')):.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    for path in argv:
        result = json.loads(Path(path).read_text())
        sat_path = Path(path).with_name(Path(path).name.replace("loadtest_", "loadtest_saturation_"))
        sat = None
        if sat_path.is_file():
            sat = json.loads(sat_path.read_text())["runs"][0]["summary"]["saturation"]["requests_per_s"]
        print(f"### {path}\n")
        print(markdown(result, sat))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
