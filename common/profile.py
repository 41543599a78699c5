"""The iteration-time profile written by `fastserve profile` and read by skip-join and the simulator.

File format (JSON):

    {
      "version": 1,
      "model": "tiny", "device": "cpu", "dtype": "float32", "num_stages": 1,
      "block_size": 16,
      "prefill": {"input_len": [16, 32, ...], "seconds": [...]},        # batch size 1, whole model
      "decode": {"batch_size": [1, 2, ...], "context_len": [64, ...],
                 "seconds": [[...], ...]},                               # seconds[i][j]: batch_size[i], context_len[j]
      "stack": {"num_stages": 2, "batch_size": [1, 8, ...], "seconds": [...],   # optional
                "prefill_len": [64, 512, ...], "prefill_seconds": [...]}        # optional within it
    }

Times are for one iteration of the whole model (all stages in sequence), in seconds. The optional
"stack" section is what the running stack adds to every iteration around that compute (the control
plane, the hops between processes, the pipeline's waits), measured through `fastserve up` by
`python -m bench.stack_cost` at a few batch sizes for one stage count, and what a prefill of a given
length adds on top (its prompt crosses the stages as activations, and its compute runs slower inside
the stack than alone); the simulator adds both to each iteration (`bench.costmodel.ProfileCost`). The
scheduler's policies never read it.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

VERSION = 1


class ProfileError(ValueError):
    """The profile file is missing or malformed."""


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear interpolation, extrapolated linearly from the two nearest points at either end."""
    if len(xs) == 1:
        return float(ys[0]) * (x / xs[0] if xs[0] else 1.0)
    i = bisect.bisect_left(xs, x)
    i = min(max(i, 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    y = y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return max(float(y), 0.0)


def _stack_fields(stack: Any) -> dict[str, Any]:
    if stack is None:
        return {}
    return {"stack_stages": int(stack["num_stages"]), "stack_batch": tuple(int(x) for x in stack["batch_size"]),
            "stack_s": tuple(float(x) for x in stack["seconds"]),
            "stack_prefill_len": tuple(int(x) for x in stack.get("prefill_len", ())),
            "stack_prefill_s": tuple(float(x) for x in stack.get("prefill_seconds", ()))}


@dataclass(frozen=True)
class Profile:
    prefill_len: tuple[int, ...]  # input lengths, tokens, increasing
    prefill_s: tuple[float, ...]  # seconds of a batch-1 prefill at each length
    decode_batch: tuple[int, ...]  # batch sizes, increasing
    decode_context: tuple[int, ...]  # context lengths, tokens, increasing
    decode_s: tuple[tuple[float, ...], ...]  # seconds, [batch][context]
    meta: dict[str, Any]
    stack_stages: int = 0  # stage count the stack overhead was measured with; 0 = none measured
    stack_batch: tuple[int, ...] = ()  # batch sizes, increasing
    stack_s: tuple[float, ...] = ()  # seconds the stack adds to one iteration at each batch size
    stack_prefill_len: tuple[int, ...] = ()  # prompt lengths, increasing
    stack_prefill_s: tuple[float, ...] = ()  # seconds a prefill of that length adds beyond the above

    def overhead_time(self, batch_size: int, num_stages: int) -> float:
        """Seconds the running stack adds to an iteration of `batch_size` jobs (0 when it was not
        measured for this stage count)."""
        if not self.stack_s or num_stages != self.stack_stages or batch_size <= 0:
            return 0.0
        if len(self.stack_batch) == 1:
            return self.stack_s[0]
        return _interp(self.stack_batch, self.stack_s, min(max(batch_size, self.stack_batch[0]), self.stack_batch[-1]))

    def prefill_overhead_time(self, input_len: int, num_stages: int) -> float:
        """Seconds the running stack adds for one prefill of `input_len` tokens in an iteration, beyond
        overhead_time (0 when not measured for this stage count); linear beyond the measured lengths."""
        if not self.stack_prefill_s or num_stages != self.stack_stages:
            return 0.0
        return _interp(self.stack_prefill_len, self.stack_prefill_s, max(input_len, self.stack_prefill_len[0]))

    def prefill_time(self, input_len: int) -> float:
        """Seconds of the first iteration of a job with this many prompt tokens, alone."""
        return _interp(self.prefill_len, self.prefill_s, input_len)

    def decode_time(self, batch_size: int, context_len: float) -> float:
        """Seconds of one decode iteration of `batch_size` jobs whose mean context is `context_len`."""
        if batch_size <= 0:
            return 0.0
        per_ctx = [_interp(self.decode_batch, [row[j] for row in self.decode_s], batch_size) for j in range(len(self.decode_context))]
        return _interp(self.decode_context, per_ctx, context_len)

    def iteration_time(self, prefill_lens: Sequence[int], decode_contexts: Sequence[int]) -> float:
        """Estimate of a mixed iteration: the decode part plus each prefill's extra time over a decode step."""
        t = 0.0
        if decode_contexts:
            t = self.decode_time(len(decode_contexts), sum(decode_contexts) / len(decode_contexts))
        base = self.decode_time(1, 1) if prefill_lens and decode_contexts else 0.0
        return t + sum(max(self.prefill_time(n) - base, 0.0) for n in prefill_lens)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Profile":
        try:
            pre, dec = data["prefill"], data["decode"]
            prof = cls(
                prefill_len=tuple(int(x) for x in pre["input_len"]),
                prefill_s=tuple(float(x) for x in pre["seconds"]),
                decode_batch=tuple(int(x) for x in dec["batch_size"]),
                decode_context=tuple(int(x) for x in dec["context_len"]),
                decode_s=tuple(tuple(float(x) for x in row) for row in dec["seconds"]),
                meta={k: v for k, v in data.items() if k not in ("prefill", "decode", "stack")},
                **_stack_fields(data.get("stack")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ProfileError(f"profile is malformed ({e!r}); regenerate it with `fastserve profile --out FILE`") from None
        if not prof.prefill_len or len(prof.prefill_len) != len(prof.prefill_s):
            raise ProfileError("profile prefill.input_len and prefill.seconds must be non-empty and the same length")
        if len(prof.decode_s) != len(prof.decode_batch) or any(len(r) != len(prof.decode_context) for r in prof.decode_s):
            raise ProfileError("profile decode.seconds must be [len(batch_size)][len(context_len)]")
        if len(prof.stack_batch) != len(prof.stack_s) or list(prof.stack_batch) != sorted(set(prof.stack_batch)):
            raise ProfileError("profile stack.batch_size must be strictly increasing and as long as stack.seconds")
        if len(prof.stack_prefill_len) != len(prof.stack_prefill_s) \
                or list(prof.stack_prefill_len) != sorted(set(prof.stack_prefill_len)):
            raise ProfileError("profile stack.prefill_len must be strictly increasing and as long as stack.prefill_seconds")
        if not prof.decode_batch or not prof.decode_context:
            raise ProfileError("profile decode.batch_size and decode.context_len must be non-empty")
        for name in ("prefill_len", "decode_batch", "decode_context"):
            xs = getattr(prof, name)
            if list(xs) != sorted(set(xs)):
                raise ProfileError(f"profile {name} must be strictly increasing")
        return prof

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            **self.meta,
            "prefill": {"input_len": list(self.prefill_len), "seconds": list(self.prefill_s)},
            "decode": {
                "batch_size": list(self.decode_batch),
                "context_len": list(self.decode_context),
                "seconds": [list(r) for r in self.decode_s],
            },
            **({"stack": {"num_stages": self.stack_stages, "batch_size": list(self.stack_batch),
                          "seconds": list(self.stack_s),
                          **({"prefill_len": list(self.stack_prefill_len), "prefill_seconds": list(self.stack_prefill_s)}
                             if self.stack_prefill_s else {})}} if self.stack_s else {}),
        }

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        p = Path(path)
        if not p.is_file():
            raise ProfileError(f"profile {str(p)!r} does not exist; write one with `fastserve profile --out FILE`")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ProfileError(f"profile {str(p)!r} is not JSON: {e}") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")
