"""Incremental detokenization that never emits half a character."""

from __future__ import annotations

from typing import Callable

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

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # ids before this are fully emitted

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
