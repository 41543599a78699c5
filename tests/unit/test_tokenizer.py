"""Tokenizers: byte-level default and a tokenizer.json directory."""

import pytest

from common.model.spec import ModelError
from common.model.tokenizer import ByteTokenizer, load_tokenizer


def test_default_is_byte_level_and_round_trips():
    tok = load_tokenizer("tiny")
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 259
    ids = tok.encode("héllo")
    assert ids == [104, 195, 169, 108, 108, 111]
    assert tok.decode(ids + [257, 258]) == "héllo"  # special ids decode to nothing
    assert tok.decode([195]) == "\ufffd"  # a cut multi-byte character never raises


def test_directory_without_tokenizer_gives_none(tmp_path):
    assert load_tokenizer(str(tmp_path)) is None


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))


def test_tokenizer_json_is_loaded(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    t = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    t.decoder = tokenizers.decoders.WordPiece()
    t.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(str(tmp_path))
    assert tok.vocab_size == 3
    assert tok.encode("hello world hello") == [1, 2, 1]
    assert tok.decode([1, 2]) == "hello world"


def test_malformed_tokenizer_json_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path))
