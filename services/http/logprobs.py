"""Logprobs in OpenAI's shapes: each token's own text and bytes, the completions and the chat formats."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from common.protocol import TokenLogprobs


def _byte_level_alphabet() -> dict[str, int]:
    """The character each byte is written as in a byte-level BPE vocabulary (GPT-2's scheme), inverted:
    printable Latin-1 bytes stand for themselves, the other 68 bytes take the characters from U+0100 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = [b for b in range(256) if b not in printable]
    alphabet = {chr(b): b for b in printable}
    alphabet.update({chr(256 + i): b for i, b in enumerate(others)})
    return alphabet


class TokenPieces:
    """The bytes of one token id as the model writes them, and their text (U+FFFD for a partial character)."""

    def __init__(self, to_bytes: Callable[[int], bytes]) -> None:
        self._to_bytes = to_bytes
        self._cache: dict[int, bytes] = {}

    @classmethod
    def for_model(cls, path: str) -> "TokenPieces":
        from common.model.spec import TINY

        file = Path(path) / "tokenizer.json"
        if path == TINY or not file.is_file():  # the built-in byte model: ids 0..255 are bytes, the rest special
            return cls(lambda i: bytes([i]) if 0 <= i < 256 else b"")
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(file))
        if type(tok.decoder).__name__ != "ByteLevel":  # other vocabularies: the token decoded on its own
            return cls(lambda i: tok.decode([i], skip_special_tokens=False).encode())
        alphabet = _byte_level_alphabet()
        return cls(lambda i: b"".join(bytes([alphabet[c]]) if c in alphabet else c.encode()
                                      for c in tok.id_to_token(i) or ""))

    def bytes(self, token_id: int) -> bytes:
        out = self._cache.get(token_id)
        if out is None:
            out = self._cache[token_id] = self._to_bytes(token_id)
        return out

    def text(self, token_id: int) -> str:
        return self.bytes(token_id).decode("utf-8", errors="replace")


def completion_logprobs(pieces: TokenPieces, token_ids: list[int], entries: list[TokenLogprobs],
                        offset: int) -> dict[str, Any]:
    """The legacy completions shape for these tokens; text_offset counts characters from `offset`."""
    tokens = [pieces.text(t) for t in token_ids]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{pieces.text(i): lp for i, lp in zip(e.top_ids, e.top_logprobs)} for e in entries],
        "text_offset": offsets,
    }


def chat_logprobs(pieces: TokenPieces, token_ids: list[int], entries: list[TokenLogprobs]) -> dict[str, Any]:
    """The chat shape: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""

    def one(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": pieces.text(token_id), "logprob": logprob, "bytes": list(pieces.bytes(token_id))}

    content = [{**one(t, e.logprob), "top_logprobs": [one(i, lp) for i, lp in zip(e.top_ids, e.top_logprobs)]}
               for t, e in zip(token_ids, entries)]
    return {"content": content, "refusal": None}
