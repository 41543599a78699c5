"""Incremental detokenization that never emits half a character.

Three ways, one contract (`add(token_ids) -> text delta`, `flush() -> the rest`; the deltas and the
flush add up to the tokenizer's decode of all the ids): an incremental UTF-8 decoder for the byte
tokenizer, the `tokenizers` library's DecodeStream for a tokenizer.json (one compiled call per token),
and the windowed decode below for any other tokenizer. `detokenizer(tokenizer)` picks.
"""

from __future__ import annotations

import codecs
from typing import Any, Callable, Protocol, Sequence

from common.model.tokenizer import ByteTokenizer, HFTokenizer

REPLACEMENT = "\ufffd"  # what a byte-level decode shows for an incomplete utf-8 sequence
MAX_SPLIT = 3  # tokens an incomplete character can end with (utf-8 characters are at most 4 bytes)
MAX_HELD = 4  # held tokens that no boundary can complete are invalid bytes, not an incomplete character


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decoding token by token is wrong twice over: a character may span several byte tokens, and some
    tokenizers change the rendering of a token by its neighbours (leading spaces). So each step decodes
    a short window of already-emitted tokens plus the new ones and emits the text the new ones added;
    if that text ends in U+FFFD the trailing bytes are an incomplete character and wait for more tokens
    Text before such a tail is emitted at once; a tail that stays unreadable for MAX_HELD tokens is invalid
    bytes (a random or confused model produces them) and is emitted as U+FFFD rather than held forever.
    """

    def __init__(self, decode: Callable[[list[int]], str], ids: Sequence[int] = (), emitted: int = 0) -> None:
        """`ids` already seen, of which the first `emitted` are emitted (picking up from another detokenizer)."""
        self._decode = decode
        self._ids: list[int] = list(ids)
        self._read = emitted  # ids before this are fully emitted
        self._prefix = max(0, emitted - MAX_HELD)  # start of the decode window: some context before _read

    def add(self, token_ids: list[int]) -> str:
        """Text delta after appending token_ids ("" while a character is incomplete)."""
        self._ids.extend(token_ids)
        n = len(self._ids)
        prefix_text = self._safe_decode(self._ids[self._prefix : self._read])
        # emit up to the last token boundary after which no incomplete character remains
        for end in range(n, max(self._read, n - MAX_SPLIT) - 1, -1):
            text = self._safe_decode(self._ids[self._prefix : end])
            if len(text) > len(prefix_text) and not text.endswith(REPLACEMENT):
                return self._emit(text[len(prefix_text) :], end)
        if n - self._read >= MAX_HELD:  # no boundary helps: the bytes are invalid, not incomplete
            return self._emit(self._safe_decode(self._ids[self._prefix :])[len(prefix_text) :], n)
        return ""

    def _emit(self, delta: str, end: int) -> str:
        self._prefix, self._read = self._read, end
        return delta

    def flush(self) -> str:
        """The remaining text at the end of the request, incomplete characters shown as U+FFFD."""
        prefix_text = self._safe_decode(self._ids[self._prefix : self._read])
        text = self._safe_decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(prefix_text) :] if text.startswith(prefix_text) else text

    def _safe_decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        try:
            return self._decode(ids)
        except UnicodeDecodeError:  # a strict byte-level decoder on a split character
            return REPLACEMENT


class Detokenizer(Protocol):
    def add(self, token_ids: list[int]) -> str: ...

    def flush(self) -> str: ...


class Utf8Stream:
    """The byte tokenizer's ids through Python's incremental UTF-8 decoder: an incomplete character waits
    for its bytes, invalid bytes come out as U+FFFD as soon as they are known to be invalid."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_ids: list[int]) -> str:
        return self._decoder.decode(ByteTokenizer.to_bytes(token_ids))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class DecodeStream:
    """A tokenizer.json's ids through the `tokenizers` library's DecodeStream, one compiled call per token.

    DecodeStream holds the tokens of an incomplete character until it completes, holds invalid bytes
    forever, and raises on some sequences of odd tokens. So once MAX_HELD tokens are held, when it
    raises, and at the end, this request continues on the windowed decode from the last token
    DecodeStream emitted.
    """

    def __init__(self, tokenizer: HFTokenizer) -> None:
        from tokenizers.decoders import DecodeStream as _Stream

        self._tokenizer = tokenizer
        self._backend = tokenizer.backend
        self._stream: Any = _Stream(skip_special_tokens=True)
        self._ids: list[int] = []
        self._read = 0  # ids before this are emitted
        self._window: IncrementalDetokenizer | None = None  # set once held tokens needed the windowed decode

    def add(self, token_ids: list[int]) -> str:
        if self._window is not None:
            return self._window.add(token_ids)
        ids, step, backend, out = self._ids, self._stream.step, self._backend, ""
        for k, token in enumerate(token_ids):
            ids.append(token)
            try:
                text = step(backend, token)
            except Exception:  # the library gives up on some sequences ("Invalid prefix encountered")
                return out + self._windowed().add(list(token_ids[k + 1 :]))
            if text is not None:
                out += text
                self._read = len(ids)
        if len(ids) - self._read >= MAX_HELD:
            out += self._windowed().add([])
        return out

    def flush(self) -> str:
        if self._window is None and len(self._ids) == self._read:
            return ""
        return self._windowed().flush()

    def _windowed(self) -> IncrementalDetokenizer:
        if self._window is None:
            self._window = IncrementalDetokenizer(self._tokenizer.decode, self._ids, self._read)
        return self._window


def detokenizer(tokenizer: Any) -> Detokenizer | None:
    """The incremental detokenizer for one request: the tokenizer's fastest (see the module docstring)."""
    if tokenizer is None:
        return None
    if isinstance(tokenizer, ByteTokenizer):
        return Utf8Stream()
    if isinstance(tokenizer, HFTokenizer):
        return DecodeStream(tokenizer)
    return IncrementalDetokenizer(tokenizer.decode)
