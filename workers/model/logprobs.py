"""Log-probabilities of the sampled tokens on the last stage (pure): the token's and the top-k alternatives."""

from __future__ import annotations

import math

import torch

from common.messages import TokenLogprobs

FLOOR = -9999.0  # stands for log(0): JSON has no -inf (vLLM writes the same value)


def token_logprobs(logits: torch.Tensor, tokens: list[int], asked: list[int | None]) -> list[TokenLogprobs | None]:
    """Per row of logits [B, V]: the log-softmax of that row at tokens[i] and its asked[i] most likely entries.

    Rows with asked[i] None (or a failed sample, token -1) get None; when no row asks, the list is
    empty. The distribution is the model's own, before temperature, top-k and top-p, as vLLM reports
    it by default: the same token gets the same logprob however it was sampled.
    """
    if logits.dim() != 2 or not logits.shape[0] == len(tokens) == len(asked):
        raise ValueError(f"token_logprobs needs logits [B, V] with B = len(tokens) = len(asked); got "
                         f"{tuple(logits.shape)}, {len(tokens)} tokens, {len(asked)} asks")
    rows = [i for i, k in enumerate(asked) if k is not None and tokens[i] >= 0]
    if not rows:
        return []
    logp = torch.log_softmax(logits[rows].float(), dim=-1)
    k = min(max(asked[i] for i in rows), logp.shape[1])
    chosen = logp.gather(1, torch.tensor([[tokens[i]] for i in rows], device=logp.device)).squeeze(1).cpu().tolist()
    top = torch.topk(logp, k, dim=-1) if k else None
    top_values = top.values.cpu().tolist() if top is not None else [[] for _ in rows]
    top_ids = top.indices.cpu().tolist() if top is not None else [[] for _ in rows]
    out: list[TokenLogprobs | None] = [None] * len(tokens)
    for j, i in enumerate(rows):
        n = asked[i]
        out[i] = TokenLogprobs(_finite(chosen[j]), top_ids[j][:n], [_finite(v) for v in top_values[j][:n]])
    return out


def _finite(value: float) -> float:
    return value if math.isfinite(value) else FLOOR
