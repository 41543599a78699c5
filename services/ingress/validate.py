"""Admission checks of a client request against the model and the KV pool (pure)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

from common.protocol import DEFAULT_MAX_TOKENS, ErrorCode, Generate


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class Limits:
    """What a request must fit: the model, the KV pool and the admission bound."""

    vocab_size: int  # token ids are in [0, vocab_size)
    max_context: int  # tokens: prompt + output
    block_size: int  # tokens per KV block
    num_gpu_blocks: int  # blocks in the device KV pool (per stage)
    max_jobs_in_system: int  # accepted, unfinished jobs at most
    default_max_tokens: int = DEFAULT_MAX_TOKENS  # a request without max_tokens gets min(this, the context left)
    num_host_blocks: int = 0  # blocks of the host pool that swapped-out KV may use (0: no swapping)
    kv_overcommit: float = 1.0  # admitted jobs may need this many times the device + host blocks; 0 = no bound

    @property
    def kv_budget(self) -> int:
        """KV blocks the admitted jobs may need at most, each counted at its worst (prompt + max_tokens):
        with the default 1.0, everything admitted fits device and host pools together, so no job's KV is
        ever dropped for lack of room, and load past that is answered `overloaded` instead of thrashing."""
        if self.kv_overcommit <= 0:
            return 1 << 62
        return int((self.num_gpu_blocks + self.num_host_blocks) * self.kv_overcommit)

    def kv_blocks(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    @property
    def max_message_bytes(self) -> int:
        """Largest client frame ingress accepts: a request whose prompt fills the context, as token
        ids (msgpack: at most 9 bytes each) or as text (16 bytes a token is already more than any
        vocabulary's longest tokens average), plus the other fields. A larger frame could only be
        refused after costing memory and time every other client would wait for."""
        return 64 * 1024 + 16 * self.max_context

    @classmethod
    def from_config(cls, config: Any, spec: Any) -> "Limits":
        return cls(
            vocab_size=spec.vocab_size,
            max_context=config.model.max_context or spec.max_context,
            block_size=config.cache.block_size,
            num_gpu_blocks=config.cache.num_gpu_blocks,
            max_jobs_in_system=config.scheduler.max_jobs_in_system,
            default_max_tokens=config.ingress.default_max_tokens,
            num_host_blocks=config.cache.num_host_blocks if config.cache.swap in ("proactive", "reactive") else 0,
            kv_overcommit=config.ingress.kv_overcommit,
        )


class Rejected(Exception):
    """A request that cannot be served; becomes an ErrorEvent with this code."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def prompt_ids(req: Generate, tokenizer: Tokenizer | None, limits: Limits) -> list[int]:
    """The request's prompt as token ids, checked against the vocabulary; raises Rejected."""
    if (req.prompt is None) == (req.prompt_ids is None):
        raise Rejected(ErrorCode.INVALID_REQUEST, "give exactly one of prompt (text) and prompt_ids")
    if req.prompt is not None:
        if tokenizer is None:
            raise Rejected(ErrorCode.INVALID_REQUEST, "this model has no tokenizer; send prompt_ids instead of text")
        ids = tokenizer.encode(req.prompt) if req.prompt else []
    else:
        ids = list(req.prompt_ids or [])
    if not ids:
        raise Rejected(ErrorCode.INVALID_REQUEST, "the prompt is empty")
    _check_vocab("prompt_ids", ids, limits.vocab_size)
    return ids


def output_limit(req: Generate, num_prompt: int, limits: Limits) -> int:
    """The request's max_tokens, or the default: limits.default_max_tokens, capped by the context left."""
    if req.max_tokens is not None:
        return req.max_tokens
    left = limits.max_context - num_prompt
    if left < 1:
        raise Rejected(ErrorCode.CONTEXT_TOO_LONG,
                       f"{num_prompt} prompt tokens leave no room for output in the context of {limits.max_context}")
    return min(limits.default_max_tokens, left)


def check(req: Generate, num_prompt: int, max_tokens: int, limits: Limits) -> None:
    """Raise Rejected unless the sampling fields are sane and the job fits the context and the KV pool."""
    if req.top_p <= 0.0:
        raise Rejected(ErrorCode.INVALID_REQUEST, f"top_p is {req.top_p}; use a value in (0, 1]")
    if not all(req.stop):
        raise Rejected(ErrorCode.INVALID_REQUEST, "a stop string is empty; every stop string needs a character")
    _check_vocab("stop_token_ids", req.stop_token_ids, limits.vocab_size)
    total = num_prompt + max_tokens
    if total > limits.max_context:
        raise Rejected(
            ErrorCode.CONTEXT_TOO_LONG,
            f"{num_prompt} prompt tokens + max_tokens {max_tokens} = {total} exceeds the context of "
            f"{limits.max_context} tokens",
        )
    blocks = limits.kv_blocks(total)
    if blocks > limits.num_gpu_blocks:
        raise Rejected(
            ErrorCode.CANNOT_FIT,
            f"the job needs {blocks} KV blocks of {limits.block_size} tokens but the pool has "
            f"{limits.num_gpu_blocks}; lower max_tokens or shorten the prompt",
        )


def _check_vocab(name: str, ids: list[int], vocab_size: int) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise Rejected(ErrorCode.INVALID_REQUEST, f"{name} holds {bad}, outside the vocabulary [0, {vocab_size})")
