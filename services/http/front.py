"""The front door's collaborators and what it knows of the served model; API requests become stack requests."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from common.client import AsyncClient
from common.curve import client_keys
from common.model.spec import TINY
from common.protocol import ErrorCode
from services.http.chat import ChatTemplate, ChatTemplateError
from services.http.errors import ApiError
from services.http.logprobs import TokenPieces
from services.http.metrics import Metrics
from services.http.schema import ChatRequest, CompletionRequest, Sampling


@dataclass(frozen=True)
class ServedModel:
    name: str  # what /v1/models lists and requests' `model` must say
    max_context: int  # tokens, prompt + output
    created: int  # unix seconds: when this front door started


class PromptEncoder:
    """Prompt text as the stack's token ids.

    The front door tokenizes so that it knows the prompt's length (the default max_tokens is the
    context left) and so that chat prompts get no second BOS: a completion prompt gets the tokenizer's
    special tokens, as ingress gives text prompts; a rendered chat template writes them itself, so it
    gets none, as transformers' apply_chat_template(tokenize=True) does.
    """

    def __init__(self, encode: Callable[[str, bool], list[int]] | None) -> None:
        self._encode = encode  # (text, add_special_tokens) -> ids; None: the model has no tokenizer

    @classmethod
    def for_model(cls, path: str) -> "PromptEncoder":
        from common.model.tokenizer import load_tokenizer

        if path == TINY:  # bytes: no special tokens to add or skip
            tok = load_tokenizer(path)
            return cls(lambda text, special: tok.encode(text))
        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            return cls(None)
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(file))
        return cls(lambda text, special: list(tok.encode(text, add_special_tokens=special).ids))

    def encode(self, text: str, special: bool) -> list[int]:
        if self._encode is None:
            raise ApiError.invalid("this model has no tokenizer; send the prompt as a list of token ids")
        return self._encode(text, special)


@dataclass(frozen=True)
class Plan:
    """One stack request, ready for AsyncClient.stream."""

    request_id: str  # also the response's `id`
    prompt_ids: list[int]
    params: dict[str, Any]  # Generate fields besides the prompt: max_tokens, temperature, stop, logprobs, ...
    stream: bool  # SSE to the HTTP client (the stack streams to the front door either way)
    include_usage: bool  # stream_options.include_usage
    logprobs: int | None = None  # alternatives per token's logprobs; None = no logprobs

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


class FrontDoor:
    """The client of ingress plus the model facts every endpoint needs; from_config builds the real ones."""

    def __init__(self, client: AsyncClient, model: ServedModel, encoder: PromptEncoder, template: ChatTemplate,
                 metrics: Metrics, default_max_tokens: int = 256, max_body_bytes: int = 1 << 20,
                 pieces: TokenPieces | None = None) -> None:
        self.client = client
        self.model = model
        self.encoder = encoder
        self.pieces = pieces or TokenPieces.for_model(TINY)  # token ids as text, for logprobs
        self.template = template
        self.metrics = metrics
        self.default_max_tokens = default_max_tokens
        self.max_body_bytes = max_body_bytes

    @classmethod
    def from_config(cls, config: Any) -> "FrontDoor":
        """Read the model's spec, tokenizer and chat template; the client connects on first use."""
        from common.model.spec import load_spec

        path = config.model.path
        spec = load_spec(path)
        name = config.http.model_name or (TINY if path == TINY else Path(path).name)
        model = ServedModel(name, config.model.max_context or spec.max_context, int(time.time()))
        template = ChatTemplate.fallback() if path == TINY else ChatTemplate.for_model(path)
        client = AsyncClient(config.endpoints.client, timeout=config.http.request_timeout_s,
                             keys=client_keys(config.security))
        return cls(client, model, PromptEncoder.for_model(path), template, Metrics(),
                   config.http.default_max_tokens, config.http.max_body_bytes, TokenPieces.for_model(path))

    def plan_completion(self, req: CompletionRequest) -> Plan:
        self._check(req)
        ids = self.encoder.encode(req.prompt, True) if isinstance(req.prompt, str) else list(req.prompt)
        return self._plan("cmpl", req, ids)

    def plan_chat(self, req: ChatRequest) -> Plan:
        self._check(req)
        try:
            text = self.template.render([m.for_template() for m in req.messages])
        except ChatTemplateError as e:
            raise ApiError.invalid(str(e)) from None
        return self._plan("chatcmpl", req, self.encoder.encode(text, False))

    def _check(self, req: Sampling) -> None:
        req.check_supported()
        if req.model is not None and req.model != self.model.name:
            raise ApiError(404, f"the model {req.model!r} is not served here; this server serves {self.model.name!r}",
                           "model_not_found")

    def _plan(self, kind: str, req: Sampling, ids: list[int]) -> Plan:
        if not ids:
            raise ApiError.invalid("the prompt is empty")
        left = self.model.max_context - len(ids)
        if left < 1:  # checked here, not left to ingress: its socket drops a connection sending a frame this big
            raise ApiError.invalid(f"the prompt has {len(ids)} tokens; the context holds {self.model.max_context} "
                                   "(prompt and output)", ErrorCode.CONTEXT_TOO_LONG, "prompt")
        max_tokens = req.output_limit()
        if max_tokens is None:
            max_tokens = min(self.default_max_tokens, left)
        params = {"max_tokens": max_tokens, "temperature": req.temperature, "top_k": max(req.top_k, 0),
                  "top_p": req.top_p, "seed": req.seed, "stop_token_ids": list(req.stop_token_ids or []),
                  "ignore_eos": req.ignore_eos, "stop": req.stop_strings(), "logprobs": req.logprobs_asked()}
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return Plan(f"{kind}-{uuid.uuid4().hex}", ids, params, req.stream, include_usage, req.logprobs_asked())

    async def close(self) -> None:
        await self.client.close()
