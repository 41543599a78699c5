"""`vllm bench serve`'s metrics, names and definitions, from load-test outcomes (pure), and its printed block.

Per finished request: TTFT = first token - send, E2EL = last event - send, TPOT = (E2EL - TTFT) /
(output tokens - 1) for more than one token (0 for goodput otherwise), ITL = every gap between
consecutive token events, pooled over requests. Throughputs divide by the duration: from the first
measured request's send to the last one's end. Goodput counts requests meeting every SLO given
(ttft, tpot, e2el in ms). All latencies are reported in milliseconds: mean, median, std and the
asked percentiles of the asked metrics, under the JSON keys vLLM writes (mean_ttft_ms, p99_itl_ms, ...).
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from bench.loadtest.driver import Outcome

METRICS = {"ttft": ("TTFT", "Time to First Token"), "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
           "itl": ("ITL", "Inter-token Latency"), "e2el": ("E2EL", "End-to-end Latency")}
DEFAULT_PERCENTILE_METRICS = ("ttft", "tpot", "itl")  # vLLM's --percentile-metrics default
DEFAULT_PERCENTILES = (99.0,)  # vLLM's --metric-percentiles default


def parse_goodput(items: Iterable[str]) -> dict[str, float]:
    """vLLM's --goodput syntax: KEY:MILLISECONDS with KEY ttft, tpot or e2el."""
    out = {}
    for item in items:
        key, _, value = item.partition(":")
        if key not in ("ttft", "tpot", "e2el"):
            raise ValueError(f"goodput item {item!r}: the key must be ttft, tpot or e2el")
        try:
            out[key] = float(value)
        except ValueError:
            raise ValueError(f"goodput item {item!r}: {value!r} is not a number of milliseconds") from None
        if out[key] <= 0:
            raise ValueError(f"goodput item {item!r}: the bound must be > 0 ms")
    return out


def parse_list(text: str, allowed: Iterable[str] | None = None) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if allowed is not None and x not in allowed]
    if bad or not items:
        raise ValueError(f"unknown metric {', '.join(bad) or '(none)'}; use any of {', '.join(allowed or [])}")
    return items


def p_word(p: float) -> str:
    return str(int(p)) if int(p) == p else str(p)


def serve_metrics(outcomes: Iterable[Outcome], percentiles: Iterable[float] = DEFAULT_PERCENTILES,
                  percentile_metrics: Iterable[str] = DEFAULT_PERCENTILE_METRICS,
                  goodput: dict[str, float] | None = None) -> dict[str, Any]:
    measured = [o for o in outcomes if not o.warmup]
    done = [o for o in measured if o.ok]
    values: dict[str, list[float]] = {"ttft": [], "tpot": [], "itl": [], "e2el": []}
    all_tpots = []
    for o in done:
        ttft, e2el = o.first_token_s - o.sent_s, o.finish_s - o.sent_s
        tpot = (e2el - ttft) / (o.tokens - 1) if o.tokens > 1 else 0.0
        if o.tokens > 1:
            values["tpot"].append(tpot)
        all_tpots.append(tpot)
        values["ttft"].append(ttft)
        values["e2el"].append(e2el)
        values["itl"] += o.itl_s
    duration = (max(o.finish_s for o in measured) - min(o.sent_s for o in measured)) if measured else 0.0
    total_in, total_out = sum(o.input_len for o in done), sum(o.tokens for o in done)
    per_s = (lambda n: n / duration) if duration > 0 else (lambda n: 0.0)
    out: dict[str, Any] = {
        "duration": duration, "completed": len(done), "failed": len(measured) - len(done),
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": per_s(len(done)), "output_throughput": per_s(total_out),
        "total_token_throughput": per_s(total_in + total_out),
    }
    if goodput:
        bounds = {"ttft": values["ttft"], "tpot": all_tpots, "e2el": values["e2el"]}
        good = sum(1 for i in range(len(done)) if all(bounds[k][i] * 1000 <= ms for k, ms in goodput.items()))
        out["request_goodput"] = per_s(good)
    for metric in percentile_metrics:
        ms = np.asarray(values[metric] or [0.0]) * 1000
        out[f"mean_{metric}_ms"] = float(ms.mean())
        out[f"median_{metric}_ms"] = float(np.median(ms))
        out[f"std_{metric}_ms"] = float(ms.std())
        for p in percentiles:
            out[f"p{p_word(p)}_{metric}_ms"] = float(np.percentile(ms, p))
    return out


def format_serve_metrics(m: dict[str, Any], percentiles: Iterable[float] = DEFAULT_PERCENTILES,
                         percentile_metrics: Iterable[str] = DEFAULT_PERCENTILE_METRICS) -> str:
    """The block `vllm bench serve` prints, with the same labels."""
    row = "{:<40} {:<10}".format
    num = "{:<40} {:<10.2f}".format
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="),
             row("Successful requests:", m["completed"]), num("Benchmark duration (s):", m["duration"]),
             row("Total input tokens:", m["total_input_tokens"]), row("Total generated tokens:", m["total_output_tokens"]),
             num("Request throughput (req/s):", m["request_throughput"])]
    if "request_goodput" in m:
        lines.append(num("Request goodput (req/s):", m["request_goodput"]))
    lines += [num("Output token throughput (tok/s):", m["output_throughput"]),
              num("Total Token throughput (tok/s):", m["total_token_throughput"])]
    for metric in percentile_metrics:
        name, header = METRICS[metric]
        lines += ["{s:{c}^{n}}".format(s=header, n=50, c="-"), num(f"Mean {name} (ms):", m[f"mean_{metric}_ms"]),
                  num(f"Median {name} (ms):", m[f"median_{metric}_ms"])]
        lines += [num(f"P{p_word(p)} {name} (ms):", m[f"p{p_word(p)}_{metric}_ms"]) for p in percentiles]
    lines.append("=" * 50)
    return "\n".join(lines)
