"""Llama 3.x RoPE scaling and Qwen2 q/k/v biases give transformers' logits; other rope types are refused."""

import dataclasses
import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_model_hf import DECODE_STEPS, _hf_run, _our_run  # noqa: E402
from workers.model.llama import inv_freq  # noqa: E402
from workers.model.runner import StageRunner  # noqa: E402
from common.model.spec import ModelError, load_spec  # noqa: E402

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=3, rms_norm_eps=1e-5,
             initializer_range=0.2, bos_token_id=1, eos_token_id=2)
# 150 tokens: past the original 64-token context, where the stretched wavelengths change attention
LONG_PROMPT = torch.randint(3, 97, (150,), generator=torch.Generator().manual_seed(3)).tolist()
PROMPT = [5, 17, 3, 44, 9, 23, 61, 7, 30, 11, 2, 19, 40]


def _assert_same(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    for step, (a, b) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"step {step}: {m}")


def _write_config(path, cfg: dict) -> None:
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    # head_dim 16 with theta 10000: wavelengths 6 to 2e4 tokens, so some are kept, some blended, some stretched
    cfg = transformers.LlamaConfig(**SMALL, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=512, rope_theta=10000.0, rope_scaling=dict(LLAMA3))
    torch.manual_seed(4)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "llama3")
    runner = StageRunner.build(str(tmp_path / "llama3"), num_blocks=12, block_size=16)

    scaled = model.model.rotary_emb.inv_freq
    assert torch.equal(inv_freq(runner.spec), scaled)
    ratio = scaled / inv_freq(dataclasses.replace(runner.spec, rope_original_context=0))
    assert (ratio == 1).any() and (ratio == 1 / 8).any() and ((ratio < 1) & (ratio > 1 / 8)).any()

    hf_logits, hf_tokens = _hf_run(model, LONG_PROMPT, 4)
    our_logits, our_tokens = _our_run(runner, LONG_PROMPT, 4)
    assert our_tokens == hf_tokens
    _assert_same(our_logits, hf_logits)

    # the same weights under the default RoPE ("default" in rope_parameters loads too) give other logits
    shutil.copytree(tmp_path / "llama3", tmp_path / "plain")
    plain_cfg = json.loads((tmp_path / "plain" / "config.json").read_text())
    plain_cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    _write_config(tmp_path / "plain", plain_cfg)
    plain = StageRunner.build(str(tmp_path / "plain"), num_blocks=12, block_size=16)
    assert plain.spec.rope_original_context == 0
    plain_logits, _ = _our_run(plain, LONG_PROMPT, 4)
    assert all((a - b).abs().max() > 1e-2 for a, b in zip(plain_logits, hf_logits))


def test_hub_style_llama3_config_is_parsed(tmp_path):
    # Llama 3.1 checkpoints on the Hub keep the old key rope_scaling and a top-level rope_theta
    cfg = transformers.LlamaConfig(**SMALL, num_attention_heads=4, max_position_embeddings=512).to_dict()
    del cfg["rope_parameters"]
    _write_config(tmp_path, cfg | {"rope_theta": 500000.0, "rope_scaling": dict(LLAMA3)})
    spec = load_spec(str(tmp_path))
    assert (spec.rope_theta, spec.rope_factor, spec.rope_low_freq_factor) == (500000.0, 8.0, 1.0)
    assert (spec.rope_high_freq_factor, spec.rope_original_context) == (4.0, 64)


def test_qwen2_qkv_bias_and_gqa_match_transformers(tmp_path):
    cfg = transformers.Qwen2Config(**SMALL, num_attention_heads=8, num_key_value_heads=2,
                                   max_position_embeddings=256, rope_theta=5000.0)
    torch.manual_seed(5)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # transformers zeroes biases at init; random ones make the test see them
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(std=0.5)
    model.save_pretrained(tmp_path)
    runner = StageRunner.build(str(tmp_path), num_blocks=8, block_size=8)
    assert runner.spec.qkv_bias and not runner.spec.o_bias and runner.spec.num_kv_heads == 2

    hf_logits, hf_tokens = _hf_run(model, PROMPT, DECODE_STEPS)
    our_logits, our_tokens = _our_run(runner, PROMPT, DECODE_STEPS)
    assert our_tokens == hf_tokens
    _assert_same(our_logits, hf_logits)
    assert len(set(hf_tokens)) > 1


@pytest.mark.parametrize("kind", ["yarn", "linear", "dynamic"])
def test_unsupported_rope_type_is_refused(tmp_path, kind):
    cfg = transformers.LlamaConfig(**SMALL, num_attention_heads=4, max_position_embeddings=512).to_dict()
    _write_config(tmp_path, cfg | {"rope_parameters": {"rope_type": kind, "factor": 4.0, "rope_theta": 10000.0}})
    with pytest.raises(ModelError, match=f"rope type '{kind}' is not supported") as e:
        load_spec(str(tmp_path))
    assert "\n" not in str(e.value)
