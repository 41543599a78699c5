"""The per-request detokenizers add up to the tokenizer's own decode, never emit half a character, and
never hold invalid bytes for more than MAX_HELD tokens."""

from __future__ import annotations

import json
import random

import pytest

from common.model.tokenizer import ByteTokenizer, HFTokenizer
from services.ingress.detok import MAX_HELD, DecodeStream, IncrementalDetokenizer, Utf8Stream, detokenizer

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: E402

TEXT = "Hello world! ñandú, 漢字 😀🎉 The quick brown fox   jumps\n\nover  the lazy dog."
CORPUS = [TEXT, "some more text with spaces   and\nnewlines", "numbers 12345 and symbols #$%&"] * 40


def _byte_level(tmp_path) -> HFTokenizer:
    """GPT-2 style: byte-level BPE (SmolLM2, Llama 3, Qwen)."""
    t = tokenizers.Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    t.save(str(tmp_path / "tokenizer.json"))
    return HFTokenizer(tmp_path / "tokenizer.json")


def _metaspace(tmp_path) -> HFTokenizer:
    """SentencePiece style: a leading-space marker whose rendering depends on the position, and byte
    fallback tokens <0xXX> for characters outside the vocabulary."""
    t = tokenizers.Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    trained = json.loads(t.to_str())["model"]
    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    sp = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True))
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    sp.add_special_tokens(["<s>"])
    d = tmp_path / "sp"
    d.mkdir()
    sp.save(str(d / "tokenizer.json"))
    return HFTokenizer(d / "tokenizer.json")


@pytest.fixture(params=["bytes", "byte-level", "metaspace"])
def tok(request, tmp_path):
    return {"bytes": ByteTokenizer, "byte-level": _byte_level, "metaspace": _metaspace}[request.param](
        *(() if request.param == "bytes" else (tmp_path,)))


def _stream(tok, ids: list[int], rng: random.Random) -> list[str]:
    detok = detokenizer(tok)
    deltas, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 3)
        deltas.append(detok.add(ids[i : i + n]))
        i += n
    return deltas + [detok.flush()]


def test_the_tokenizer_picks_its_detokenizer(tok):
    want = Utf8Stream if isinstance(tok, ByteTokenizer) else DecodeStream
    assert type(detokenizer(tok)) is want
    assert detokenizer(None) is None

    class Other:
        def decode(self, ids: list[int]) -> str:
            return "".join(map(str, ids))

    assert type(detokenizer(Other())) is IncrementalDetokenizer


ALPHABET = "abcdefghij klmnop  qrstuvwxyz\nABC.,!?0123456789ñú漢字€😀🎉"


def test_deltas_of_any_text_add_up_to_the_tokenizers_decode(tok):
    rng = random.Random(3)
    for _ in range(150):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randrange(1, 60)))
        ids = tok.encode(text)
        deltas = _stream(tok, ids, rng)
        assert "".join(deltas) == tok.decode(ids)
        assert not any("\ufffd" in d for d in deltas)  # valid text: never half a character


def test_any_ids_stream_through_and_nothing_stays_held(tok):
    """Random ids (what a model with random weights samples) are not always text: the deltas need not
    match a decode of the whole (no decoder's pieces do), but every token comes out by the flush."""
    rng = random.Random(5)
    for _ in range(150):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 50))]
        detok = detokenizer(tok)
        for k in range(0, len(ids), 2):
            detok.add(ids[k : k + 2])
        detok.flush()
        assert detok.flush() == ""
        assert detok.add([]) == ""


def test_text_streams_back_whole_characters_token_by_token(tok):
    ids = tok.encode(TEXT)
    detok = detokenizer(tok)
    deltas = [detok.add([i]) for i in ids] + [detok.flush()]
    assert "".join(deltas) == tok.decode(ids)
    assert TEXT in tok.decode(ids)  # (a tokenizer.json may add special tokens that decode to nothing)
    assert not any("\ufffd" in d for d in deltas)


def test_invalid_bytes_come_out_within_max_held_tokens(tok):
    if isinstance(tok, ByteTokenizer):
        lone = [0xB0]  # a continuation byte with nothing before it
    else:
        lone = [i for i in range(tok.vocab_size) if tok.decode([i]) == "\ufffd"][:1]  # a lone byte token
    assert lone, "the tokenizer has a token that is an invalid byte on its own"
    detok = detokenizer(tok)
    deltas = [detok.add(lone) for _ in range(2 * MAX_HELD)]
    assert "".join(deltas[:MAX_HELD]), "held for more than MAX_HELD tokens"
    assert "".join(deltas) + detok.flush() == tok.decode(lone * 2 * MAX_HELD)
