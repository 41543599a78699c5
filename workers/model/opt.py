"""OPT-family layers (learned positions with OPT's offset of 2, LayerNorm, ReLU MLP) for one stage."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.attention import AttentionBackend, ReferenceAttention
from kernels.paged_attention import AttnMeta, store_kv
from common.model.spec import ModelSpec
from workers.model.weights import Weights


class OPTStage:
    """Layers [lo, hi); token and position embeddings on the first stage, final norm and LM head on the last."""

    def __init__(self, spec: ModelSpec, weights: Weights, lo: int, hi: int, device: torch.device,
                 attention: AttentionBackend | None = None) -> None:
        self.spec, self.w, self.lo, self.hi = spec, weights, lo, hi
        self.attention = attention or ReferenceAttention(spec.head_dim ** -0.5)

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.w[name], self.w[name + "_bias"], self.spec.norm_eps)

    def embed(self, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = F.embedding(token_ids, self.w["embed"])
        if "project_in" in self.w:
            x = F.linear(x, self.w["project_in"])
        return x + F.embedding(positions + self.spec.position_offset, self.w["pos_embed"])

    def prepare(self, meta: AttnMeta) -> None:
        """Nothing per step: OPT adds positions once, at the embedding."""
        return None

    def layer(self, i: int, h: torch.Tensor, pool: torch.Tensor, meta: AttnMeta, extra=None) -> torch.Tensor:
        s, w, p = self.spec, self.w, f"layers.{i}."
        t = h.shape[0]
        x = self._norm(h, p + "attn_norm") if s.pre_norm else h
        q, k, v = F.linear(x, w[p + "qkv"], w.get(p + "qkv_bias")).split(s.hidden_size, dim=-1)
        q = q.view(t, s.num_heads, s.head_dim)
        k = k.view(t, s.num_kv_heads, s.head_dim)
        v = v.view(t, s.num_kv_heads, s.head_dim)
        store_kv(pool, i - self.lo, k, v, meta)
        h = h + F.linear(self.attention.attend(pool, i - self.lo, q, k, v, meta), w[p + "o"], w.get(p + "o_bias"))
        if not s.pre_norm:
            h = self._norm(h, p + "attn_norm")
        x = self._norm(h, p + "mlp_norm") if s.pre_norm else h
        h = h + F.linear(F.relu(F.linear(x, w[p + "fc1"], w.get(p + "fc1_bias"))), w[p + "fc2"], w.get(p + "fc2_bias"))
        return h if s.pre_norm else self._norm(h, p + "mlp_norm")

    def head(self, h: torch.Tensor) -> torch.Tensor:
        if self.spec.final_norm:
            h = self._norm(h, "final_norm")
        if "project_out" in self.w:
            h = F.linear(h, self.w["project_out"])
        return F.linear(h, self.w["lm_head"])
