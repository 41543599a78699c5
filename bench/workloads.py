"""Request workloads shared by the simulator and the load-test driver: synthetic and trace replay.

Every workload says how it was made in `describe()`, so a result can always be traced to its input.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# ../shared/traces relative to the repository root
DEFAULT_TRACES = Path(__file__).resolve().parents[1].parent / "shared" / "traces"
TRACES = {
    "azure-code": "azure2023_code.csv",
    "azure-conv": "azure2023_conv.csv",
    "mooncake-conv": "mooncake_conversation.csv",
    "mooncake-synthetic": "mooncake_synthetic.csv",
}


@dataclass(frozen=True)
class Request:
    request_id: int
    arrival_s: float  # seconds since the start of the workload
    input_len: int  # prompt tokens
    output_len: int  # output tokens the request will generate


@dataclass(frozen=True)
class Workload:
    requests: tuple[Request, ...]  # sorted by arrival
    info: dict[str, Any] = field(default_factory=dict)  # how it was made

    def describe(self) -> dict[str, Any]:
        """The generator and its parameters plus measured statistics of the requests."""
        ins = np.array([r.input_len for r in self.requests])
        outs = np.array([r.output_len for r in self.requests])
        arrivals = np.array([r.arrival_s for r in self.requests])
        gaps = np.diff(arrivals)
        span = float(arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else 0.0
        return {
            **self.info,
            "num_requests": len(self.requests),
            "span_s": span,
            "measured_rate": (len(arrivals) - 1) / span if span > 0 else 0.0,
            "measured_cv": float(gaps.std() / gaps.mean()) if len(gaps) and gaps.mean() > 0 else 0.0,
            "input_mean": float(ins.mean()) if len(ins) else 0.0,
            "input_p50": float(np.percentile(ins, 50)) if len(ins) else 0.0,
            "input_p99": float(np.percentile(ins, 99)) if len(ins) else 0.0,
            "output_mean": float(outs.mean()) if len(outs) else 0.0,
            "output_p50": float(np.percentile(outs, 50)) if len(outs) else 0.0,
            "output_p99": float(np.percentile(outs, 99)) if len(outs) else 0.0,
        }


def zipf_lengths(n: int, exponent: float, low: int, high: int, rng: np.random.Generator) -> np.ndarray:
    """n lengths in [low, high] with P(k) proportional to k**-exponent (a bounded Zipf)."""
    if not 1 <= low <= high:
        raise ValueError(f"Zipf range must satisfy 1 <= low <= high, got [{low}, {high}]")
    if exponent < 0:
        raise ValueError(f"Zipf exponent must be >= 0, got {exponent}")
    ks = np.arange(low, high + 1, dtype=np.float64)
    cdf = np.cumsum(ks**-exponent)
    cdf /= cdf[-1]
    return (np.searchsorted(cdf, rng.random(n), side="right") + low).clip(low, high).astype(np.int64)


def gamma_arrivals(n: int, rate: float, cv: float, rng: np.random.Generator) -> np.ndarray:
    """n arrival times (first at 0) with Gamma inter-arrival gaps: mean 1/rate, std cv/rate."""
    if rate <= 0 or cv <= 0:
        raise ValueError(f"arrival rate and CV must be > 0, got rate={rate}, cv={cv}")
    shape = 1.0 / cv**2
    gaps = rng.gamma(shape, 1.0 / (rate * shape), size=max(n - 1, 0))
    return np.concatenate([[0.0], np.cumsum(gaps)])


def synthetic(
    n: int,
    rate: float,
    cv: float = 1.0,
    input_zipf: tuple[float, int, int] = (1.1, 16, 2048),
    output_zipf: tuple[float, int, int] = (1.1, 1, 2048),
    max_context: int = 0,
    seed: int = 0,
) -> Workload:
    """Zipf input and output lengths ((exponent, low, high) each) with Gamma arrivals."""
    if n <= 0:
        raise ValueError(f"number of requests must be > 0, got {n}")
    rng = np.random.default_rng(seed)
    arrivals = gamma_arrivals(n, rate, cv, rng)
    ins = zipf_lengths(n, *input_zipf, rng)
    outs = zipf_lengths(n, *output_zipf, rng)
    ins, outs, clipped = clip(ins, outs, max_context)
    requests = tuple(Request(i, float(a), int(x), int(y)) for i, (a, x, y) in enumerate(zip(arrivals, ins, outs)))
    info = {
        "kind": "synthetic",
        "arrivals": {"process": "gamma", "rate": rate, "cv": cv},
        "input_len": {"dist": "zipf", "exponent": input_zipf[0], "low": input_zipf[1], "high": input_zipf[2]},
        "output_len": {"dist": "zipf", "exponent": output_zipf[0], "low": output_zipf[1], "high": output_zipf[2]},
        "max_context": max_context,
        "clipped": clipped,
        "seed": seed,
    }
    return Workload(requests, info)


def clip(ins: np.ndarray, outs: np.ndarray, max_context: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Fit prompt + output into max_context: the output keeps up to half the context, the prompt
    is cut to what remains (its most recent tokens, for a replay), then the output to fit."""
    if max_context <= 0:
        return ins, outs, 0
    if max_context < 2:
        raise ValueError(f"max_context must be >= 2 to hold a prompt and an output, got {max_context}")
    new_ins = np.minimum(ins, max_context - np.minimum(outs, max_context // 2))
    new_outs = np.minimum(outs, max_context - new_ins)
    clipped = int(np.count_nonzero((new_ins != ins) | (new_outs != outs)))
    return new_ins, new_outs, clipped


def read_trace(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Arrival seconds, input tokens and output tokens of a CSV trace (see the traces README)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"trace {str(p)!r} does not exist; traces live in {DEFAULT_TRACES}")
    with p.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != ["arrival_time_s", "input_tokens", "output_tokens"]:
            raise ValueError(f"trace {str(p)!r} must have the header arrival_time_s,input_tokens,output_tokens; got {header}")
        rows = [(float(a), int(i), int(o)) for a, i, o in reader]
    if not rows:
        raise ValueError(f"trace {str(p)!r} has no rows")
    a, i, o = (np.array(col) for col in zip(*rows))
    return a, i, o


def trace(
    name: str,
    rate: float | None = None,
    max_context: int = 0,
    limit: int = 0,
    traces_dir: str | Path = DEFAULT_TRACES,
) -> Workload:
    """Replay a trace (a key of TRACES or a CSV path): first `limit` rows (0 = all), arrival times
    scaled so the mean rate is `rate` (None = as recorded), lengths clipped to `max_context`."""
    path = Path(traces_dir) / TRACES[name] if name in TRACES else Path(name)
    arrivals, ins, outs = read_trace(path)
    if limit:
        arrivals, ins, outs = arrivals[:limit], ins[:limit], outs[:limit]
    arrivals = arrivals - arrivals[0]
    span = float(arrivals[-1])
    recorded_rate = (len(arrivals) - 1) / span if span > 0 else 0.0
    scale = 1.0
    if rate is not None:
        if rate <= 0 or recorded_rate == 0:
            raise ValueError(f"cannot scale trace {path.name} to rate {rate}")
        scale = recorded_rate / rate
    ins, outs, clipped = clip(ins, outs, max_context)
    requests = tuple(
        Request(k, float(a * scale), int(x), int(y)) for k, (a, x, y) in enumerate(zip(arrivals, ins, outs))
    )
    info = {
        "kind": "trace",
        "trace": path.name,
        "rows": len(requests),
        "recorded_rate": recorded_rate,
        "time_scale": scale,  # arrival times were multiplied by this
        "target_rate": rate,
        "max_context": max_context,
        "clipped": clipped,  # requests whose prompt or output was shortened
    }
    return Workload(requests, info)
