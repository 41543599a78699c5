"""Our model equals transformers' LlamaForCausalLM / OPTForCausalLM on the same weights, prefill and decode."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from workers.model.batch import StepInput  # noqa: E402
from workers.model.runner import StageRunner  # noqa: E402

DECODE_STEPS = 34


def _llama(tmp_path, tied: bool, kv_heads: int):
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=kv_heads, max_position_embeddings=256, rope_theta=5000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=tied, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path)
    return model


def _opt(tmp_path, pre_norm: bool, proj_dim: int):
    cfg = transformers.OPTConfig(
        vocab_size=89, hidden_size=64, ffn_dim=96, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=256, do_layer_norm_before=pre_norm, word_embed_proj_dim=proj_dim,
        init_std=0.2, dropout=0.0,
    )
    torch.manual_seed(2)
    model = transformers.OPTForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path)
    return model


def _hf_run(model, prompt: list[int], steps: int) -> tuple[list[torch.Tensor], list[int]]:
    """Greedy logits [vocab] after the prompt and after each generated token, and the tokens."""
    cache = transformers.DynamicCache()
    logits, tokens = [], []
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(steps + 1):
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            last = out.logits[0, -1].float()
            logits.append(last)
            tokens.append(int(last.argmax()))
            ids = torch.tensor([[tokens[-1]]])
    return logits, tokens


def _our_run(runner: StageRunner, prompt: list[int], steps: int) -> tuple[list[torch.Tensor], list[int]]:
    table = list(range(runner.num_blocks))[::-1]  # a reversed table: paging is exercised too
    logits, tokens = [], []
    ids, ctx = prompt, 0
    for _ in range(steps + 1):
        out = runner.forward(StepInput([0], [len(ids)], [ctx], [table], token_ids=torch.tensor(ids)))
        ctx += len(ids)
        logits.append(out[0])
        tokens.append(int(out[0].argmax()))
        ids = [tokens[-1]]
    return logits, tokens


@pytest.mark.parametrize("make,arg1,arg2", [
    (_llama, False, 2), (_llama, True, 4), (_llama, False, 8), (_opt, True, 64), (_opt, False, 32),
], ids=["llama-gqa-untied", "llama-gqa-tied", "llama-mha", "opt-prenorm", "opt-postnorm-proj"])
def test_logits_and_greedy_tokens_match_transformers(tmp_path, make, arg1, arg2):
    model = make(tmp_path, arg1, arg2)
    prompt = [5, 17, 3, 44, 9, 23, 61, 7, 30, 11, 2, 19, 40]
    hf_logits, hf_tokens = _hf_run(model, prompt, DECODE_STEPS)
    runner = StageRunner.build(str(tmp_path), num_blocks=8, block_size=8)
    our_logits, our_tokens = _our_run(runner, prompt, DECODE_STEPS)
    assert our_tokens == hf_tokens
    for step, (ours, ref) in enumerate(zip(our_logits, hf_logits)):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4, msg=lambda m: f"step {step}: {m}")
    assert len(set(hf_tokens)) > 1  # the comparison covers a non-degenerate continuation
