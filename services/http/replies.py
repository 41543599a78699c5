"""Response bodies and stream chunks of /v1/completions and /v1/chat/completions, as OpenAI shapes them."""

from __future__ import annotations

from typing import Any


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Replies:
    """One request's response shapes; subclasses name the objects and where the text goes."""

    full_object = ""
    chunk_object = ""

    def __init__(self, request_id: str, model: str, created: int, include_usage: bool) -> None:
        self.request_id = request_id
        self.model = model
        self.created = created  # unix seconds
        self.include_usage = include_usage  # stream_options.include_usage: `usage: null` on every chunk, then a usage chunk

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def full(self, text: str, finish_reason: str, use: dict[str, int]) -> dict[str, Any]:
        body = self._envelope(self.full_object, [{"index": 0, **self._whole(text), "logprobs": None,
                                                  "finish_reason": finish_reason}])
        body["usage"] = use
        return body

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False) -> dict[str, Any]:
        body = self._envelope(self.chunk_object, [{"index": 0, **self._piece(text, first), "logprobs": None,
                                                   "finish_reason": finish_reason}])
        if self.include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, use: dict[str, int]) -> dict[str, Any]:
        return {**self._envelope(self.chunk_object, []), "usage": use}

    def head(self) -> list[dict[str, Any]]:
        """Chunks before the first text."""
        return []

    def _whole(self, text: str) -> dict[str, Any]:
        raise NotImplementedError

    def _piece(self, text: str | None, first: bool) -> dict[str, Any]:
        raise NotImplementedError


class CompletionReplies(Replies):
    full_object = "text_completion"
    chunk_object = "text_completion"

    def _whole(self, text: str) -> dict[str, Any]:
        return {"text": text}

    def _piece(self, text: str | None, first: bool) -> dict[str, Any]:
        return {"text": text or ""}


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
