"""Weights of one stage: from a HF checkpoint directory (safetensors) or seeded random for the built-in tiny model.

Tensors are kept under canonical names ("layers.3.qkv", "embed", "lm_head", ...); q/k/v and gate/up
projections are fused on load so a layer runs two matmuls fewer.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from common.model.spec import TINY, ModelError, ModelSpec, tiny_spec

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
Weights = dict[str, torch.Tensor]


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ModelError(f"dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


class Checkpoint:
    """Lazy reader of a HF checkpoint's tensors, by name with any leading "model." stripped."""

    def __init__(self, path: str) -> None:
        from safetensors import safe_open

        d = Path(path)
        index, single = d / "model.safetensors.index.json", d / "model.safetensors"
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise ModelError(f"{index} is malformed: {e!r}") from None
        elif single.is_file():
            files = [single.name]
        else:
            raise ModelError(f"model directory {path!r} has no model.safetensors or model.safetensors.index.json")
        self._where: dict[str, tuple[object, str]] = {}
        for name in files:
            try:
                handle = safe_open(str(d / name), framework="pt")
            except Exception as e:  # safetensors raises its own error types for missing/corrupt files
                raise ModelError(f"cannot read weight file {d / name}: {e}") from None
            for key in handle.keys():
                self._where[key.removeprefix("model.")] = (handle, key)
        self.path = path

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise ModelError(f"weights in {self.path!r} lack tensor {name!r}")
        handle, key = self._where[name]
        return handle.get_tensor(key)


def _llama_hf(ck: Checkpoint, spec: ModelSpec, lo: int, hi: int, first: bool, last: bool) -> Weights:
    w: Weights = {}
    if first or (last and spec.tie_word_embeddings and not ck.has("lm_head.weight")):
        w["embed"] = ck.get("embed_tokens.weight")
    for i in range(lo, hi):
        p, o = f"layers.{i}.", f"layers.{i}."
        w[o + "in_norm"] = ck.get(p + "input_layernorm.weight")
        w[o + "post_norm"] = ck.get(p + "post_attention_layernorm.weight")
        w[o + "qkv"] = torch.cat([ck.get(f"{p}self_attn.{x}_proj.weight") for x in "qkv"])
        if spec.qkv_bias:
            w[o + "qkv_bias"] = torch.cat([ck.get(f"{p}self_attn.{x}_proj.bias") for x in "qkv"])
        w[o + "o"] = ck.get(p + "self_attn.o_proj.weight")
        if spec.o_bias:
            w[o + "o_bias"] = ck.get(p + "self_attn.o_proj.bias")
        w[o + "gate_up"] = torch.cat([ck.get(p + "mlp.gate_proj.weight"), ck.get(p + "mlp.up_proj.weight")])
        w[o + "down"] = ck.get(p + "mlp.down_proj.weight")
        if spec.mlp_bias:
            w[o + "gate_up_bias"] = torch.cat([ck.get(p + "mlp.gate_proj.bias"), ck.get(p + "mlp.up_proj.bias")])
            w[o + "down_bias"] = ck.get(p + "mlp.down_proj.bias")
    if last:
        w["norm"] = ck.get("norm.weight")
        w["lm_head"] = ck.get("lm_head.weight") if ck.has("lm_head.weight") or not spec.tie_word_embeddings else w["embed"]
    return w


def _opt_hf(ck: Checkpoint, spec: ModelSpec, lo: int, hi: int, first: bool, last: bool) -> Weights:
    w: Weights = {}
    tied_head = last and not ck.has("lm_head.weight")
    if first or tied_head:
        w["embed"] = ck.get("decoder.embed_tokens.weight")
    if first:
        w["pos_embed"] = ck.get("decoder.embed_positions.weight")
        if spec.word_embed_proj_dim:
            w["project_in"] = ck.get("decoder.project_in.weight")
    for i in range(lo, hi):
        p, o = f"decoder.layers.{i}.", f"layers.{i}."
        for x in ("weight", "bias"):
            sfx = "" if x == "weight" else "_bias"
            w[o + "attn_norm" + sfx] = ck.get(p + "self_attn_layer_norm." + x)
            w[o + "mlp_norm" + sfx] = ck.get(p + "final_layer_norm." + x)
            if x == "weight" or spec.qkv_bias:
                w[o + "qkv" + sfx] = torch.cat([ck.get(f"{p}self_attn.{q}_proj.{x}") for q in "qkv"])
                w[o + "o" + sfx] = ck.get(p + "self_attn.out_proj." + x)
                w[o + "fc1" + sfx] = ck.get(p + "fc1." + x)
                w[o + "fc2" + sfx] = ck.get(p + "fc2." + x)
    if last:
        if spec.final_norm:
            w["final_norm"] = ck.get("decoder.final_layer_norm.weight")
            w["final_norm_bias"] = ck.get("decoder.final_layer_norm.bias")
        if spec.word_embed_proj_dim:
            w["project_out"] = ck.get("decoder.project_out.weight")
        w["lm_head"] = w["embed"] if tied_head else ck.get("lm_head.weight")
    return w


@functools.lru_cache(maxsize=4)
def random_weights(spec: ModelSpec, seed: int) -> Weights:
    """Seeded random Llama weights (cached per process), scaled so greedy logits are well separated."""
    if spec.family != "llama":
        raise ModelError("random weights exist only for the llama family")
    g = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    h, kv, inner = spec.hidden_size, spec.kv_size, spec.intermediate_size
    w: Weights = {"embed": normal(spec.vocab_size, h, std=1.0)}
    for i in range(spec.num_layers):
        o = f"layers.{i}."
        w[o + "in_norm"] = torch.ones(h)
        w[o + "post_norm"] = torch.ones(h)
        w[o + "qkv"] = normal(spec.q_size + 2 * kv, h, std=h ** -0.5)
        w[o + "o"] = normal(h, spec.q_size, std=0.5 * spec.q_size ** -0.5)
        w[o + "gate_up"] = normal(2 * inner, h, std=h ** -0.5)
        w[o + "down"] = normal(h, inner, std=0.5 * inner ** -0.5)
    w["norm"] = torch.ones(h)
    # logits ~ N(0, 4^2): the top two of a few hundred are rarely closer than float noise
    w["lm_head"] = normal(spec.vocab_size, h, std=4.0 * h ** -0.5)
    return w


def load_weights(path: str, spec: ModelSpec, lo: int, hi: int, seed: int = 0) -> Weights:
    """Canonical-name tensors (float32 or the file's dtype, on CPU) for layers [lo, hi) and the ends they own."""
    first, last = lo == 0, hi == spec.num_layers
    if path == TINY:
        full = random_weights(tiny_spec(), seed)
        keep = {k for k in full if not k.startswith("layers.") or lo <= int(k.split(".")[1]) < hi}
        keep -= set() if first else {"embed"}
        keep -= set() if last else {"norm", "lm_head"}
        return {k: full[k] for k in keep}
    ck = Checkpoint(path)
    build = _llama_hf if spec.family == "llama" else _opt_hf
    return build(ck, spec, lo, hi, first, last)
