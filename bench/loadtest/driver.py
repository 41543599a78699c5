"""Open-loop driver: send each request of a plan at its time through a backend, record what came back.

Backends: the ZeroMQ client library (`AsyncClient`, the default) or an OpenAI-compatible HTTP server
(`bench/loadtest/openai_backend.py`: FastServe's front door, vLLM, SGLang, ...), measured the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

from bench.loadtest.plan import Send
from common.client import AsyncClient, FastServeError
from common.curve import ClientKeys


@dataclass(frozen=True)
class Outcome:
    """One request as the client saw it; times are seconds after the start of the run."""

    index: int  # position in the plan
    scheduled_s: float  # when the plan said to send it (its arrival)
    sent_s: float  # when it went out (later than scheduled under a concurrency cap or a busy client)
    first_token_s: float  # first token event; 0.0 when none came
    finish_s: float  # finish or error event
    input_len: int  # prompt tokens
    max_tokens: int  # output tokens asked for
    tokens: int  # output tokens received
    warmup: bool
    error: str = ""  # protocol error code ("overloaded", "timeout", ...) or "" when it finished
    itl_s: list[float] = field(default_factory=list)  # seconds between consecutive token events (chunks)

    @property
    def ok(self) -> bool:
        return not self.error and self.tokens > 0


SendOne = Callable[[Send, float], Awaitable[Outcome]]  # (request, run start on perf_counter) -> outcome


class Timeline:
    """Arrival times of one request's token events: first token and inter-token gaps, as vLLM's bench keeps them."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.sent_s = self.now()
        self.first_s = 0.0
        self.last: float | None = None
        self.itl: list[float] = []

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def event(self) -> None:
        now = self.now()
        if self.last is None:
            self.first_s = now
        else:
            self.itl.append(now - self.last)
        self.last = now

    def outcome(self, send: Send, tokens: int, error: str) -> Outcome:
        return Outcome(send.index, send.at_s, self.sent_s, self.first_s, self.now(), len(send.prompt_ids),
                       send.max_tokens, tokens, send.warmup, error, self.itl)


async def run_one(client: AsyncClient, send: Send, t0: float, timeout: float) -> Outcome:
    """Stream one request; every error ends up in the outcome, never as an exception."""
    line = Timeline(t0)
    tokens, error = 0, ""
    try:
        async for event in client.stream(prompt_ids=list(send.prompt_ids), max_tokens=send.max_tokens,
                                         ignore_eos=True, timeout=timeout):
            if event.token_ids:
                line.event()
            tokens += len(event.token_ids)
    except FastServeError as e:
        error = e.code or "error"
    return line.outcome(send, tokens, error)


@contextlib.asynccontextmanager
async def zmq_backend(address: str, timeout: float, keys: ClientKeys | None = None) -> AsyncIterator[SendOne]:
    """The client library; `keys` for a stack with security.curve on (functools.partial binds them)."""
    async with AsyncClient(address, timeout=timeout, keys=keys) as client:
        await client.wait_ready(timeout=60.0)
        yield lambda send, t0: run_one(client, send, t0, timeout)


async def run_load(
    address: str,
    plan: Sequence[Send],
    concurrency: int = 0,
    timeout: float = 600.0,
    on_done: Callable[[Outcome], Any] | None = None,
    backend: Callable[[str, float], Any] = zmq_backend,
) -> list[Outcome]:
    """Send every request at its scheduled time; `concurrency` > 0 caps requests in flight (later ones
    wait in the client, and that wait counts in their latency since arrival is the scheduled time).
    `backend(address, timeout)` is an async context giving the function that sends one request."""
    if concurrency < 0:
        raise ValueError(f"concurrency cap must be >= 0 (0 = none), got {concurrency}")
    gate = asyncio.Semaphore(concurrency) if concurrency else None
    async with backend(address, timeout) as send_one:
        t0 = time.perf_counter()

        async def fire(send: Send) -> Outcome:
            delay = send.at_s - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)  # the arrival process itself, not a synchronization wait
            if gate is None:
                outcome = await send_one(send, t0)
            else:
                async with gate:
                    outcome = await send_one(send, t0)
            if on_done is not None:
                on_done(outcome)
            return outcome

        outcomes = await asyncio.gather(*(fire(s) for s in plan))
    return sorted(outcomes, key=lambda o: o.index)
