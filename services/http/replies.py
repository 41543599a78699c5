"""Response bodies and stream chunks of /v1/completions and /v1/chat/completions, as OpenAI shapes them."""

from __future__ import annotations

from typing import Any

from common.protocol import TokenLogprobs
from services.http.logprobs import TokenPieces, chat_logprobs, completion_logprobs


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Replies:
    """One request's response shapes; subclasses name the objects and where the text goes."""

    full_object = ""
    chunk_object = ""

    def __init__(self, request_id: str, model: str, created: int, include_usage: bool,
                 pieces: TokenPieces | None = None) -> None:
        self.request_id = request_id
        self.model = model
        self.created = created  # unix seconds
        self.include_usage = include_usage  # stream_options.include_usage: `usage: null` on every chunk, then a usage chunk
        self.pieces = pieces  # None: the request asked for no logprobs (they are then null)
        self.text_offset = 0  # characters of text already shown, for the completions logprobs' text_offset

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def full(self, text: str, finish_reason: str, use: dict[str, int], token_ids: list[int] | None = None,
             logprobs: list[TokenLogprobs] | None = None) -> dict[str, Any]:
        body = self._envelope(self.full_object, [{"index": 0, **self._whole(text),
                                                  "logprobs": self._logprobs(token_ids, logprobs),
                                                  "finish_reason": finish_reason}])
        body["usage"] = use
        return body

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False,
              token_ids: list[int] | None = None, logprobs: list[TokenLogprobs] | None = None) -> dict[str, Any]:
        body = self._envelope(self.chunk_object, [{"index": 0, **self._piece(text, first),
                                                   "logprobs": self._logprobs(token_ids, logprobs),
                                                   "finish_reason": finish_reason}])
        if self.include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, use: dict[str, int]) -> dict[str, Any]:
        return {**self._envelope(self.chunk_object, []), "usage": use}

    def head(self) -> list[dict[str, Any]]:
        """Chunks before the first text."""
        return []

    def _logprobs(self, token_ids: list[int] | None, entries: list[TokenLogprobs] | None) -> dict[str, Any] | None:
        if self.pieces is None or not entries:
            return None
        return self._format_logprobs(token_ids or [], entries)

    def _whole(self, text: str) -> dict[str, Any]:
        raise NotImplementedError

    def _piece(self, text: str | None, first: bool) -> dict[str, Any]:
        raise NotImplementedError

    def _format_logprobs(self, token_ids: list[int], entries: list[TokenLogprobs]) -> dict[str, Any]:
        raise NotImplementedError


class CompletionReplies(Replies):
    full_object = "text_completion"
    chunk_object = "text_completion"

    def _whole(self, text: str) -> dict[str, Any]:
        return {"text": text}

    def _piece(self, text: str | None, first: bool) -> dict[str, Any]:
        return {"text": text or ""}

    def _format_logprobs(self, token_ids: list[int], entries: list[TokenLogprobs]) -> dict[str, Any]:
        out = completion_logprobs(self.pieces, token_ids, entries, self.text_offset)
        self.text_offset += sum(len(t) for t in out["tokens"])
        return out


class ChatReplies(Replies):
    full_object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def head(self) -> list[dict[str, Any]]:
        return [self.chunk("", first=True)]  # OpenAI opens with the role and empty content

    def _whole(self, text: str) -> dict[str, Any]:
        return {"message": {"role": "assistant", "content": text}}

    def _piece(self, text: str | None, first: bool) -> dict[str, Any]:
        if first:
            return {"delta": {"role": "assistant", "content": text or ""}}
        return {"delta": {} if text is None else {"content": text}}

    def _format_logprobs(self, token_ids: list[int], entries: list[TokenLogprobs]) -> dict[str, Any]:
        return chat_logprobs(self.pieces, token_ids, entries)
