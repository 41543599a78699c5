"""Request bodies of the OpenAI API as far as the stack serves them; anything else is a 400.

Strict: no coercion ("1" is not a number, true is not an integer), unknown fields refused, so a
client learns at once that a field it relies on does nothing here.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from common.messages import MAX_LOGPROBS
from common.protocol import MAX_PROMPT_IDS, MAX_STOP_CHARS, MAX_STOPS
from services.http.errors import ApiError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False  # one more chunk before [DONE]: empty choices, the request's usage


StopStrings = Annotated[StrictStr, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class Sampling(_Strict):
    """Fields both endpoints share: the sampling of one output and how it is delivered."""

    model: StrictStr | None = None  # must name the served model when given
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None  # None: http.default_max_tokens or the context left
    temperature: Annotated[float, Field(ge=0.0, le=100.0)] = 1.0  # OpenAI's default; 0 = greedy
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[StrictInt, Field(ge=-1)] = 0  # 0 or -1 (vLLM's spelling) = off
    seed: Annotated[StrictInt, Field(ge=0, le=2**63 - 1)] | None = None
    stop: StopStrings | Annotated[list[StopStrings], Field(max_length=MAX_STOPS)] | None = None
    stop_token_ids: Annotated[list[StrictInt], Field(max_length=1024)] | None = None  # vLLM extension
    ignore_eos: bool = False  # vLLM extension: generate past end-of-sequence tokens
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None  # accepted, unused
    # OpenAI fields the stack does not serve; accepted only at their "off" values
    n: StrictInt = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def output_limit(self) -> int | None:
        return self.max_tokens

    def logprobs_asked(self) -> int | None:
        """How many alternatives each token's logprobs list; None = no logprobs."""
        return None

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def check_supported(self) -> None:
        """Raise a 400 for what is valid OpenAI but not built here."""
        if self.n != 1:
            raise ApiError.invalid(f"n is {self.n}; only n = 1 is served (one choice per request)",
                                   "unsupported_parameter")
        if self.presence_penalty or self.frequency_penalty:
            raise ApiError.invalid("presence_penalty and frequency_penalty are not served; leave them 0",
                                   "unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise ApiError.invalid("stream_options is only allowed with stream: true")


class CompletionRequest(Sampling):
    """POST /v1/completions."""

    prompt: StrictStr | Annotated[list[StrictInt], Field(min_length=1, max_length=MAX_PROMPT_IDS)]
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None  # alternatives per token
    echo: bool = False
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo or self.best_of not in (None, 1) or self.suffix:
            raise ApiError.invalid("echo, best_of > 1 and suffix are not served", "unsupported_parameter")

    def logprobs_asked(self) -> int | None:
        return self.logprobs


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None  # text parts are joined with newlines, as vLLM does
    name: StrictStr | None = None

    def for_template(self) -> dict[str, str]:
        """The plain dict a chat template reads (transformers hands templates the same shape)."""
        content = self.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        out = {"role": self.role, "content": content or ""}
        if self.name is not None:
            out["name"] = self.name
        return out


class ChatRequest(Sampling):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None  # alternatives per token; needs logprobs

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError.invalid("top_logprobs needs logprobs: true", param="top_logprobs")
        if (self.top_logprobs or 0) > MAX_LOGPROBS:
            raise ApiError.invalid(f"top_logprobs is {self.top_logprobs}; at most {MAX_LOGPROBS} are served",
                                   "unsupported_parameter", "top_logprobs")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ApiError.invalid("max_tokens and max_completion_tokens disagree; give one of them")

    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None
