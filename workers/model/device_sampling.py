"""Batched sampling where the logits live: temperature, top-k, top-p and seeded draws for all rows at once.

Design note: the host path (sampling.py) copies each sampled row to the CPU and draws from a torch
Generator per row. Here every row is filtered in one batched pass (one sort on the device) and drawn
by the Gumbel-max rule, argmax(logits + Gumbel noise), with the noise a pure function of (the row's
key, token id): a 32-bit integer hash of counters, computed in int64 without overflow. A row's key is
splitmix64(seed, step) as on the host path, so a seeded request's tokens never depend on its batch.
The tokens differ from the host path's for the same seed (another generator), not in distribution.
"""

from __future__ import annotations

import torch

from workers.model.sampling import SamplingParams, _mix, _process_rng

_M32 = 0xFFFFFFFF
_C1, _C2 = 0x7FEB352D, 0x846CA68B  # multipliers of a well-mixing 32-bit hash (xor-shift, multiply, twice)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x < 2**32, in int64 without overflow: two 16-bit halves of c."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _C1)
    x = x ^ (x >> 15)
    x = _mul32(x, _C2)
    return x ^ (x >> 16)


def gumbel_noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """[R, vocab] float32 Gumbel(0, 1) noise; keys [R, 2] int64 32-bit halves; row r depends on keys[r] only."""
    token = torch.arange(vocab, device=keys.device, dtype=torch.long)[None, :]
    h = _hash32(_hash32(token ^ keys[:, :1]) ^ keys[:, 1:])
    u = ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))  # in (0, 1), never 0 or 1
    return -torch.log(-torch.log(u))


def row_key(p: SamplingParams, step: int) -> int:
    """A 64-bit key: from (seed, step) for a seeded request, from the process generator otherwise."""
    if p.seed is None:
        return int(torch.randint(0, 1 << 62, (1,), generator=_process_rng))
    return _mix(p.seed, step)


def filtered_logits(x: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [R, V] after temperature, top-k, top-p, sorted descending (-inf where excluded), and the sort order.

    The same rule as filtered_probs: top-k keeps every token tied with the k-th; top-p keeps the smallest
    prefix of the top-k distribution whose mass reaches top_p, the top token always.
    """
    vocab = x.shape[-1]
    x = (x - x.max(dim=-1, keepdim=True).values) / temperature[:, None]
    ranked, order = x.sort(dim=-1, descending=True)
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, torch.full_like(top_k, vocab))
    kth = ranked.gather(1, (k - 1)[:, None])
    ranked = ranked.masked_fill(ranked < kth, float("-inf"))
    probs = torch.softmax(ranked, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs
    drop = (before >= top_p[:, None]) & (top_p[:, None] < 1.0)
    drop[:, 0] = False
    return ranked.masked_fill(drop, float("-inf")), order


def sample_rows_on_device(logits: torch.Tensor, params: list[SamplingParams], steps: list[int]
                          ) -> tuple[list[int], dict[int, str]]:
    """sample_rows' contract (one token per row, -1 and a message for a row that cannot be sampled), batched."""
    out = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return out.tolist(), {}
    keys = [row_key(params[i], steps[i]) for i in rows]
    # one small host-to-device copy carries every per-row value (all exact in float64)
    table = torch.tensor([[i, params[i].temperature, params[i].top_k, params[i].top_p, key >> 32, key & _M32]
                          for i, key in zip(rows, keys)], dtype=torch.float64)
    table = table.to(logits.device)
    index = table[:, 0].long()
    x = logits.index_select(0, index).float()
    bad = ~torch.isfinite(x).any(dim=-1) | torch.isnan(x).any(dim=-1)
    x = x.masked_fill(bad[:, None], 0.0)  # a bad row is reported, never drawn; keep NaN out of the batch
    ranked, order = filtered_logits(x, table[:, 1].float(), table[:, 2].long(), table[:, 3].float())
    noise = gumbel_noise(table[:, 4:6].long(), x.shape[-1]).gather(1, order)
    choice = (ranked + noise).argmax(dim=-1, keepdim=True)
    drawn = order.gather(1, choice)[:, 0]
    out = out.index_copy(0, index, torch.where(bad, torch.full_like(drawn, -1), drawn))
    tokens = torch.cat([out, bad.long()]).tolist()  # one device-to-host read for tokens and failures
    n = len(params)
    errors = {i: "sampling failed: logits are not finite" for i, failed in zip(rows, tokens[n:]) if failed}
    return tokens[:n], errors
