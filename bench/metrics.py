"""Per-request latency records and their summaries, shared by the simulator and the load-test driver."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

PERCENTILES = (50, 95, 99)


@dataclass(frozen=True)
class RequestRecord:
    request_id: int
    arrival_s: float  # seconds, workload clock
    first_scheduled_s: float  # start of the first iteration that ran the request
    first_token_s: float  # first output token available
    finish_s: float  # last output token available
    input_len: int  # prompt tokens
    output_len: int  # output tokens generated
    preemptions: int = 0  # times left out of a batch it could have joined, after having run
    swaps: int = 0  # KV swap-outs plus swap-ins

    def __post_init__(self) -> None:
        if not self.arrival_s <= self.first_scheduled_s <= self.first_token_s <= self.finish_s:
            raise ValueError(f"request {self.request_id}: times must satisfy arrival <= first scheduled <= first token <= finish")
        if self.output_len <= 0:
            raise ValueError(f"request {self.request_id}: output_len must be > 0")

    @property
    def jct_s(self) -> float:
        """Job completion time: arrival to last token."""
        return self.finish_s - self.arrival_s

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float:
        """Time per output token after the first: (JCT - TTFT) / (output tokens - 1); 0 for one token."""
        return (self.finish_s - self.first_token_s) / (self.output_len - 1) if self.output_len > 1 else 0.0

    @property
    def normalized_s(self) -> float:
        """JCT per output token."""
        return self.jct_s / self.output_len

    @property
    def queueing_s(self) -> float:
        """Arrival to the start of the first iteration that ran the request."""
        return self.first_scheduled_s - self.arrival_s


@dataclass(frozen=True)
class SLO:
    ttft_s: float = float("inf")  # a request meets the SLO when its TTFT and TPOT are both within bounds
    tpot_s: float = float("inf")
    jct_per_token_s: float = float("inf")  # bound on normalized latency

    def met(self, r: RequestRecord) -> bool:
        return r.ttft_s <= self.ttft_s and r.tpot_s <= self.tpot_s and r.normalized_s <= self.jct_per_token_s


def stats(values: Sequence[float]) -> dict[str, float]:
    """Mean, p50, p95, p99 and max (percentiles by linear interpolation)."""
    if len(values) == 0:
        return {"mean": 0.0, **{f"p{p}": 0.0 for p in PERCENTILES}, "max": 0.0}
    arr = np.asarray(values, dtype=np.float64)
    out = {"mean": float(arr.mean())}
    out.update({f"p{p}": float(v) for p, v in zip(PERCENTILES, np.percentile(arr, PERCENTILES))})
    out["max"] = float(arr.max())
    return out


def summarize(records: Iterable[RequestRecord], slo: SLO | None = None) -> dict[str, Any]:
    """Latency distributions, throughput over the span from first arrival to last finish, goodput."""
    records = list(records)
    if not records:
        return {"num_requests": 0}
    start = min(r.arrival_s for r in records)
    span = max(r.finish_s for r in records) - start
    tokens = sum(r.output_len for r in records)
    out: dict[str, Any] = {
        "num_requests": len(records),
        "span_s": span,
        "jct_s": stats([r.jct_s for r in records]),
        "ttft_s": stats([r.ttft_s for r in records]),
        "tpot_s": stats([r.tpot_s for r in records if r.output_len > 1]),
        "normalized_s": stats([r.normalized_s for r in records]),
        "queueing_s": stats([r.queueing_s for r in records]),
        "preemptions": stats([r.preemptions for r in records]),
        "swaps": stats([r.swaps for r in records]),
        "throughput_rps": len(records) / span if span > 0 else 0.0,
        "throughput_tps": tokens / span if span > 0 else 0.0,
    }
    if slo is not None:
        good = sum(1 for r in records if slo.met(r))
        out["slo"] = {k: v for k, v in vars(slo).items() if v != float("inf")}
        out["slo_attainment"] = good / len(records)
        out["goodput_rps"] = good / span if span > 0 else 0.0
    return out
