"""The load tester's HTTP backend: streamed POST /v1/completions to any OpenAI-compatible server.

Timed as `vllm bench serve` times its `openai` backend: the request starts when it is sent, the first
chunk that carries a choice is the first token, every later such chunk adds one inter-token gap, and the
output token count is the server's `usage.completion_tokens` (asked for with `stream_options`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import AsyncIterator

import httpx

from bench.loadtest.driver import Outcome, SendOne, Timeline
from bench.loadtest.plan import Send

READY_TIMEOUT_S = 60.0  # how long to wait for GET /health to answer 200


async def served_model(http: httpx.AsyncClient) -> str:
    """The first model the server lists."""
    response = await http.get("/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def wait_healthy(http: httpx.AsyncClient, timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if (await http.get("/health")).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise ValueError(f"{http.base_url} did not answer GET /health with 200 within {timeout:g} s")
        await asyncio.sleep(0.2)  # a client's retry backoff while the server starts


async def run_one(http: httpx.AsyncClient, model: str, send: Send, t0: float) -> Outcome:
    """Stream one completion; every error ends up in the outcome (its `error.code`, or the transport's)."""
    line = Timeline(t0)
    body = {"model": model, "prompt": list(send.prompt_ids), "max_tokens": send.max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    tokens, error = 0, ""
    try:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return line.outcome(send, 0, _error_code(response))
            async for raw in response.aiter_lines():
                if not raw.startswith("data: ") or raw == "data: [DONE]":
                    continue
                chunk = json.loads(raw[len("data: "):])
                if "error" in chunk:
                    error = chunk["error"].get("code") or "error"
                elif chunk.get("choices"):
                    line.event()
                elif chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.TimeoutException:
        error = "timeout"
    except httpx.HTTPError as e:
        error = type(e).__name__
    return line.outcome(send, tokens, error)


def _error_code(response: httpx.Response) -> str:
    try:
        return response.json()["error"]["code"] or f"http_{response.status_code}"
    except (ValueError, KeyError, TypeError):
        return f"http_{response.status_code}"


def openai_backend(model: str = ""):
    """A driver backend over HTTP; `address` is the server's base URL (http://HOST:PORT, without /v1)."""

    @contextlib.asynccontextmanager
    async def backend(address: str, timeout: float) -> AsyncIterator[SendOne]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=address.rstrip("/").removesuffix("/v1"), timeout=timeout,
                                     limits=limits) as http:
            await wait_healthy(http)
            name = model or await served_model(http)
            yield lambda send, t0: run_one(http, name, send, t0)

    return backend
