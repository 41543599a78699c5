"""Load-test records to the shared metrics: summaries, ratios against a baseline policy, a printed table."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from bench.loadtest.driver import Outcome
from bench.metrics import SLO, RequestRecord, stats, summarize

# Seen only inside the stack (the client cannot observe them), so they are left out of client summaries.
SERVER_ONLY = ("queueing_s", "preemptions", "swaps")
LATENCIES = ("jct_s", "ttft_s", "tpot_s", "normalized_s")
TABLE_ROWS = [(m, s) for m in LATENCIES for s in ("mean", "p50", "p95", "p99")]
TABLE_ROWS += [("throughput_rps", ""), ("throughput_tps", ""), ("goodput_rps", ""), ("slo_attainment", "")]


def to_record(o: Outcome) -> RequestRecord:
    """The shared record of a finished request; the first scheduled time is unknown to a client and is
    set to the first token time (the record is only used for latencies the client does see)."""
    first = max(o.first_token_s, o.scheduled_s)  # guards against a timer waking a hair early
    return RequestRecord(o.index, o.scheduled_s, first, first, max(o.finish_s, first), o.input_len, o.tokens)


def summarize_outcomes(outcomes: Iterable[Outcome], slo: SLO | None = None) -> dict[str, Any]:
    """Summary of the measured (non warm-up) requests: latencies of the finished ones, error counts,
    how late the client sent requests, and how many came back short of their asked length."""
    measured = [o for o in outcomes if not o.warmup]
    done = [o for o in measured if o.ok]
    out = summarize([to_record(o) for o in done], slo)
    for key in SERVER_ONLY:
        out.pop(key, None)
    errors: dict[str, int] = {}
    for o in measured:
        if not o.ok:
            errors[o.error or "no_tokens"] = errors.get(o.error or "no_tokens", 0) + 1
    out.update({
        "num_requests": len(done),
        "num_sent": len(measured),
        "errors": errors,
        "short": sum(1 for o in done if o.tokens != o.max_tokens),  # ignore_eos: should be 0
        "send_lag_s": stats([o.sent_s - o.scheduled_s for o in measured]),
    })
    if slo is not None and len(measured) > len(done):
        good = out.get("slo_attainment", 0.0) * len(done)
        out["slo_attainment"] = good / len(measured)  # failed requests miss the SLO too
    return out


def value(summary: dict[str, Any], metric: str, stat: str = "") -> float | None:
    v = summary.get(metric)
    if stat:
        v = v.get(stat) if isinstance(v, dict) else None
    return float(v) if isinstance(v, (int, float)) else None


def ratios(summaries: dict[str, dict[str, Any]], base: str = "fcfs") -> dict[str, dict[str, float]]:
    """For each policy: baseline value / policy value of each latency stat (> 1 = the policy is faster),
    and policy / baseline for throughputs (> 1 = more). Empty when the baseline did not run."""
    if base not in summaries:
        return {}
    out: dict[str, dict[str, float]] = {}
    for policy, summary in summaries.items():
        row: dict[str, float] = {}
        for metric, stat in TABLE_ROWS:
            b, v = value(summaries[base], metric, stat), value(summary, metric, stat)
            if b is None or v is None:
                continue
            num, den = (b, v) if metric in LATENCIES else (v, b)
            if den > 0:
                row[f"{metric}.{stat}" if stat else metric] = num / den
        out[policy] = row
    return out


def format_table(summaries: dict[str, dict[str, Any]], base: str = "fcfs") -> str:
    """Policies as columns, metrics as rows; latency ratios are baseline/policy ('x faster')."""
    policies = list(summaries)
    rat = ratios(summaries, base)
    head = f"{'metric':<22}" + "".join(f"{p:>16}" for p in policies)
    lines = [head, "-" * len(head)]
    for metric, stat in TABLE_ROWS:
        cells = [value(summaries[p], metric, stat) for p in policies]
        if all(c is None for c in cells):
            continue
        name = f"{metric}.{stat}" if stat else metric
        lines.append(f"{name:<22}" + "".join(f"{c:>16.4f}" if c is not None else f"{'-':>16}" for c in cells))
    lines.append(f"{'requests ok/sent':<22}" + "".join(
        f"{summaries[p]['num_requests']:>10}/{summaries[p]['num_sent']:<5}" for p in policies))
    if rat:
        lines.append(f"ratios vs {base} (latency: {base}/policy, throughput: policy/{base})")
        for key in ("jct_s.mean", "jct_s.p99", "ttft_s.mean", "normalized_s.mean", "throughput_rps"):
            lines.append(f"  {key:<20}" + "".join(
                f"{rat[p][key]:>16.3f}" if key in rat.get(p, {}) else f"{'-':>16}" for p in policies))
    return "\n".join(lines)


def jct_values(outcomes: Sequence[Outcome]) -> np.ndarray:
    """Sorted JCTs (seconds) of the measured, finished requests; for CDF plots."""
    return np.sort(np.array([o.finish_s - o.scheduled_s for o in outcomes if o.ok and not o.warmup]))


def saturation(outcomes: Sequence[Outcome], batch_jobs: int) -> dict[str, float]:
    """Capacity from a burst (every request sent at 0): output tokens per second while at least
    `batch_jobs` requests were unfinished (the batch could be full), and the request rate that offers
    that many tokens per second at the run's mean output length. The tail where a few long requests run
    alone is left out; it would understate capacity. Tokens of a request still running are counted as
    produced evenly between its first token and its finish."""
    done = [o for o in outcomes if o.ok and not o.warmup]
    if not done:
        raise ValueError("no finished requests to measure saturation from")
    finishes = sorted(o.finish_s for o in done)
    until = finishes[max(len(done) - batch_jobs, 0)]
    tokens = 0.0
    for o in done:
        if until >= o.finish_s:
            tokens += o.tokens
        elif until > o.first_token_s:
            tokens += o.tokens * (until - o.first_token_s) / (o.finish_s - o.first_token_s)
    tps = tokens / until
    mean_out = sum(o.tokens for o in done) / len(done)
    return {"busy_until_s": until, "tokens_per_s": tps, "mean_output_tokens": mean_out, "requests_per_s": tps / mean_out}


def measured_rate(outcomes: Sequence[Outcome]) -> float | None:
    """The arrival rate the run really offered: (n - 1) / (last send - first send) over the measured
    requests (a busy client or a concurrency cap sends later than planned); None below two sends."""
    sent = sorted(o.sent_s for o in outcomes if not o.warmup)
    if len(sent) < 2 or sent[-1] <= sent[0]:
        return None
    return (len(sent) - 1) / (sent[-1] - sent[0])
