"""The send schedule of a load test: workload arrivals, seeded random prompts, warm-up marks, SLO parsing."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench import workloads
from bench.metrics import SLO

BYTE_VOCAB = 256  # the tiny model's byte tokens 0..255 (bos/eos/pad lie above and are never sampled)


@dataclass(frozen=True)
class Send:
    """One request of the schedule, sent at `at_s` whatever happened to the earlier ones (open loop)."""

    index: int  # position in the schedule
    at_s: float  # seconds after the start of the run
    prompt_ids: tuple[int, ...]  # random token ids of the sampled input length
    max_tokens: int  # the sampled output length; sent with ignore_eos so exactly this many come back
    warmup: bool  # excluded from the summary


@dataclass(frozen=True)
class WorkloadSpec:
    """What to generate: a synthetic Zipf/Gamma workload, or a trace (name or CSV path) replay."""

    num: int = 100  # requests (trace: rows replayed, 0 = all)
    rate: float | None = None  # arrivals per second; None replays a trace at its recorded rate
    cv: float = 1.0  # coefficient of variation of Gamma inter-arrival gaps (synthetic)
    input_zipf: tuple[float, int, int] = (1.1, 16, 2048)  # exponent, low, high
    output_zipf: tuple[float, int, int] = (1.1, 1, 2048)
    trace: str = ""  # key of workloads.TRACES or a CSV path; empty = synthetic
    traces_dir: str = str(workloads.DEFAULT_TRACES)
    max_context: int = 2048  # prompt + output clipped to this many tokens
    seed: int = 0

    def at_rate(self, rate: float | None) -> "WorkloadSpec":
        return WorkloadSpec(self.num, rate, self.cv, self.input_zipf, self.output_zipf, self.trace,
                            self.traces_dir, self.max_context, self.seed)

    def build(self) -> workloads.Workload:
        if self.trace:
            return workloads.trace(self.trace, self.rate, self.max_context, self.num, self.traces_dir)
        if self.rate is None:
            raise ValueError("a synthetic workload needs a rate (arrivals per second)")
        return workloads.synthetic(self.num, self.rate, self.cv, self.input_zipf, self.output_zipf,
                                   self.max_context, self.seed)


def make_plan(workload: workloads.Workload, warmup: int = 0, seed: int = 0, burst: bool = False) -> list[Send]:
    """Sends for every request of `workload`; the first `warmup` are marked warm-up.

    Prompts are random byte tokens seeded by (seed, request id), so every policy of a comparison sees
    the same prompts. `burst` sends everything at time 0 (the saturation measurement).
    """
    if warmup < 0 or warmup >= len(workload.requests):
        raise ValueError(f"warm-up must be in [0, {len(workload.requests)}) requests, got {warmup}")
    sends = []
    for k, r in enumerate(workload.requests):
        if r.input_len < 1 or r.output_len < 1:
            raise ValueError(f"request {r.request_id} needs >= 1 input and output token, got {r.input_len}/{r.output_len}")
        rng = np.random.default_rng((seed, r.request_id))
        prompt = tuple(int(t) for t in rng.integers(0, BYTE_VOCAB, r.input_len))
        sends.append(Send(k, 0.0 if burst else r.arrival_s, prompt, r.output_len, k < warmup))
    return sends


def parse_zipf(text: str) -> tuple[float, int, int]:
    try:
        a, lo, hi = text.split(",")
        return float(a), int(lo), int(hi)
    except ValueError:
        raise ValueError(f"Zipf parameters must look like EXPONENT,LOW,HIGH (e.g. 1.1,1,2048), got {text!r}") from None


def parse_slo(text: str) -> SLO | None:
    """'ttft=0.5,tpot=0.05' (seconds; also 'norm=' for JCT per token) -> SLO; '' -> None."""
    if not text:
        return None
    keys = {"ttft": "ttft_s", "tpot": "tpot_s", "norm": "jct_per_token_s"}
    values: dict[str, float] = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in keys:
            raise ValueError(f"SLO item {item!r} must be NAME=SECONDS with NAME one of {', '.join(keys)}")
        try:
            seconds = float(value)
        except ValueError:
            raise ValueError(f"SLO value {value!r} of {name} is not a number of seconds") from None
        if seconds <= 0:
            raise ValueError(f"SLO {name} must be > 0 seconds, got {seconds}")
        values[keys[name.strip()]] = seconds
    return SLO(**values)


def parse_rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--rates must be comma-separated numbers, got {text!r}") from None
    if not rates or any(r <= 0 for r in rates):
        raise ValueError(f"--rates needs one or more positive arrival rates, got {text!r}")
    return rates
