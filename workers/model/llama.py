"""Llama-family layers (RMSNorm, RoPE, grouped-query attention, SwiGLU) for a layer range of one stage."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels.attention import AttentionBackend, ReferenceAttention
from kernels.paged_attention import AttnMeta, store_kv
from common.model.spec import ModelSpec
from workers.model.weights import Weights


def inv_freq(spec: ModelSpec) -> torch.Tensor:
    """RoPE inverse frequencies [head_dim / 2] in float32, llama3-scaled when the spec says so."""
    dim = spec.head_dim
    inv = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if not spec.rope_original_context:
        return inv
    # the same float32 operations in the same order as transformers' llama3 RoPE, so the tables match bit for bit
    old, factor = spec.rope_original_context, spec.rope_factor
    low, high = spec.rope_low_freq_factor, spec.rope_high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(medium, blended, scaled)


def rope_tables(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [max_context, head_dim], computed in float32 as the reference does."""
    freqs = torch.arange(spec.max_context, dtype=torch.float32)[:, None] * inv_freq(spec)[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(device, dtype), emb.sin().to(device, dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    var = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(var + eps)).to(x.dtype)


class LlamaStage:
    """Layers [lo, hi); embeddings on the first stage, final norm and LM head on the last."""

    def __init__(self, spec: ModelSpec, weights: Weights, lo: int, hi: int, device: torch.device,
                 attention: AttentionBackend | None = None) -> None:
        self.spec, self.w, self.lo, self.hi = spec, weights, lo, hi
        self.attention = attention or ReferenceAttention(spec.head_dim ** -0.5)
        dtype = next(iter(weights.values())).dtype
        self.cos, self.sin = rope_tables(spec, device, dtype)

    def embed(self, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self.w["embed"])

    def prepare(self, meta: AttnMeta) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-step values shared by every layer: RoPE cos and sin [T, 1, head_dim] of the new tokens."""
        return self.cos[meta.positions][:, None, :], self.sin[meta.positions][:, None, :]

    def layer(self, i: int, h: torch.Tensor, pool: torch.Tensor, meta: AttnMeta, rope) -> torch.Tensor:
        s, w, p = self.spec, self.w, f"layers.{i}."
        x = rms_norm(h, w[p + "in_norm"], s.norm_eps)
        qkv = F.linear(x, w[p + "qkv"], w.get(p + "qkv_bias"))
        t = h.shape[0]
        q, k, v = qkv.split([s.q_size, s.kv_size, s.kv_size], dim=-1)
        cos, sin = rope
        q = _rotate(q.view(t, s.num_heads, s.head_dim), cos, sin)
        k = _rotate(k.view(t, s.num_kv_heads, s.head_dim), cos, sin)
        v = v.view(t, s.num_kv_heads, s.head_dim)
        store_kv(pool, i - self.lo, k, v, meta)
        attn = self.attention.attend(pool, i - self.lo, q, k, v, meta)
        h = h + F.linear(attn, w[p + "o"], w.get(p + "o_bias"))
        x = rms_norm(h, w[p + "post_norm"], s.norm_eps)
        gate, up = F.linear(x, w[p + "gate_up"], w.get(p + "gate_up_bias")).chunk(2, dim=-1)
        return h + F.linear(F.silu(gate) * up, w[p + "down"], w.get(p + "down_bias"))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(rms_norm(h, self.w["norm"], self.spec.norm_eps), self.w["lm_head"])
