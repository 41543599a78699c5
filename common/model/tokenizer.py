"""Tokenizers: the byte-level one of the built-in model and a HF tokenizer.json via `tokenizers`."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from common.model.spec import TINY, ModelError, tiny_spec


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; ids above are special (bos, eos, pad) and decode to nothing."""

    def __init__(self, vocab_size: int = 259) -> None:
        if vocab_size < 256:
            raise ModelError(f"a byte-level tokenizer needs a vocabulary of at least 256 ids, not {vocab_size}")
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        # a token stream may stop inside a multi-byte character: replace, never raise
        return self.to_bytes(ids).decode("utf-8", errors="replace")

    @staticmethod
    def to_bytes(ids: list[int]) -> bytes:
        """The bytes the ids stand for; special ids (above 255) stand for none."""
        try:
            return bytes(ids)
        except ValueError:
            return bytes(i for i in ids if 0 <= i < 256)


class HFTokenizer:
    """A tokenizer.json read by the `tokenizers` library; encode adds the model's special tokens (e.g. BOS)."""

    def __init__(self, file: Path) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        try:
            self._tok = _Tokenizer.from_file(str(file))
        except Exception as e:  # the library raises its own exception type on malformed files
            raise ModelError(f"{file} is not a readable tokenizer.json: {e}") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> object:
        """The `tokenizers.Tokenizer` itself (its DecodeStream detokenizes a stream token by token)."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=True).ids)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(path: str) -> Tokenizer | None:
    """The tokenizer of a model: bytes for "tiny", tokenizer.json for a directory, None when it has none."""
    if path == TINY:
        return ByteTokenizer(tiny_spec().vocab_size)
    d = Path(path)
    if not d.is_dir():
        raise ModelError(f"model directory {path!r} does not exist "
                         "(use a Hugging Face checkpoint directory, 'smollm2-135m' or 'tiny')")
    file = d / "tokenizer.json"
    return HFTokenizer(file) if file.is_file() else None
