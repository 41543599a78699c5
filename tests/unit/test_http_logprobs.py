"""Token pieces for logprobs: a byte-level BPE token's bytes are the bytes it stands for; OpenAI's two shapes."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from common.protocol import TokenLogprobs
from services.http.logprobs import TokenPieces, chat_logprobs, completion_logprobs

TEXT = "Hello, wörld! 漢字 and\ttabs\n  spaces 😀"


def byte_level_model(tmp_path) -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|end|>"])
    tok.train_from_iterator([TEXT, "hello world", "wörld wörld"], trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    return str(tmp_path)


def test_byte_level_pieces_are_the_bytes_of_the_text(tmp_path):
    path = byte_level_model(tmp_path)
    tok = Tokenizer.from_file(f"{path}/tokenizer.json")
    ids = tok.encode(TEXT).ids
    pieces = TokenPieces.for_model(path)
    assert b"".join(pieces.bytes(i) for i in ids) == TEXT.encode()
    lead = tok.token_to_id("\u00f0")  # the byte 0xF0 (an emoji's first) stands for itself
    space = tok.token_to_id("\u0120")  # the byte 0x20 is written as U+0120
    assert (pieces.bytes(lead), pieces.text(lead)) == (b"\xf0", "\ufffd")  # part of a character: U+FFFD
    assert (pieces.bytes(space), pieces.text(tok.token_to_id("<|end|>"))) == (b" ", "<|end|>")


def test_the_built_in_byte_model_has_byte_pieces_and_empty_specials():
    pieces = TokenPieces.for_model("tiny")
    assert (pieces.bytes(65), pieces.text(65), pieces.bytes(257)) == (b"A", "A", b"")


def test_openai_shapes():
    pieces = TokenPieces.for_model("tiny")
    entries = [TokenLogprobs(-0.1, [97, 98], [-0.1, -3.0]), TokenLogprobs(-2.0, [], [])]
    assert completion_logprobs(pieces, [97, 98], entries, 5) == {
        "tokens": ["a", "b"], "token_logprobs": [-0.1, -2.0], "top_logprobs": [{"a": -0.1, "b": -3.0}, {}],
        "text_offset": [5, 6]}
    assert chat_logprobs(pieces, [97, 98], entries) == {"content": [
        {"token": "a", "logprob": -0.1, "bytes": [97], "top_logprobs": [
            {"token": "a", "logprob": -0.1, "bytes": [97]}, {"token": "b", "logprob": -3.0, "bytes": [98]}]},
        {"token": "b", "logprob": -2.0, "bytes": [98], "top_logprobs": []}], "refusal": None}
