"""Sampling on the last stage: greedy, temperature, top-k, top-p, per-request seed; stop rules."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1
_process_rng = torch.Generator().manual_seed(torch.seed())

# A temperature below this is greedy: dividing logits by it would overflow float32 (1e-45 is a valid
# float), and any distribution it leaves is a one-hot on the argmax anyway (vLLM uses the same bound).
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16  # output tokens at most
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int | None = None  # same seed + same logits -> same tokens, whatever the batch
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, not {self.max_tokens!r}")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, not {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), not {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None, not {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def finish_reason(params: SamplingParams, token: int, num_generated: int, eos_token_ids: tuple[int, ...]) -> str | None:
    """Why a job stops after emitting `token` as its num_generated-th output token: "stop", "length" or None."""
    if token in params.stop_token_ids or (not params.ignore_eos and token in eos_token_ids):
        return "stop"
    if num_generated >= params.max_tokens:
        return "length"
    return None


def _mix(seed: int, step: int) -> int:
    """splitmix64 of (seed, step): a generator seed independent of the batch and stable across processes."""
    x = (seed * 0x9E3779B97F4A7C15 + step + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


def filtered_probs(row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities of one row [V] after temperature, top-k and top-p (float32; excluded tokens are 0)."""
    row = row.float()
    if not torch.isfinite(row).any() or torch.isnan(row).any():
        raise ValueError("logits are not finite")
    # relative to the largest logit, so a small temperature sends the rest to -inf, never to inf - inf
    logits = (row - row.max()) / params.temperature
    if 0 < params.top_k < logits.shape[0]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_p, dim=0) - sorted_p
        # keep the smallest prefix whose mass reaches top_p (the top token is always kept)
        drop = before >= params.top_p
        drop[0] = False
        probs = probs.clone()
        probs[order[drop]] = 0.0
        probs = probs / probs.sum()
    return probs


def sample(logits: torch.Tensor, params: list[SamplingParams], steps: list[int]) -> list[int]:
    """One token per row of logits [B, V] (see sample_rows); raises if any row cannot be sampled."""
    tokens, errors = sample_rows(logits, params, steps)
    if errors:
        row, message = next(iter(errors.items()))
        raise ValueError(f"row {row}: {message}")
    return tokens


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], steps: list[int]) -> tuple[list[int], dict[int, str]]:
    """One token per row of logits [B, V]; steps[i] is the index of the output token job i produces.

    Greedy rows are one argmax; a seeded row draws from a generator seeded by (seed, step) alone, so
    the token never depends on which other jobs share the batch. A row that cannot be sampled gets
    token -1 and an entry in the returned {row: message}: one job's failure is its own, never the batch's.
    """
    if logits.dim() != 2 or logits.shape[0] != len(params) or len(params) != len(steps):
        raise ValueError(f"sample needs logits [B, V] with B = len(params) = len(steps); got {tuple(logits.shape)}, "
                         f"{len(params)} params, {len(steps)} steps")
    if logits.is_cuda:  # batched where the logits are, no per-row copy or host sort (device_sampling.py)
        from workers.model.device_sampling import sample_rows_on_device

        return sample_rows_on_device(logits, params, steps)
    out = logits.argmax(dim=-1).tolist()
    errors: dict[int, str] = {}
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return out, errors
    host = logits[rows].float().cpu()
    for j, i in enumerate(rows):
        p = params[i]
        gen = _process_rng if p.seed is None else torch.Generator().manual_seed(_mix(p.seed, steps[i]))
        try:
            probs = filtered_probs(host[j], p)
            out[i] = int(torch.multinomial(probs, 1, generator=gen).item())
        except (ValueError, RuntimeError) as e:  # torch reports bad distributions as RuntimeError
            out[i] = -1
            errors[i] = f"sampling failed: {e}"
    return out, errors
