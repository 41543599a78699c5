"""Open-loop driver: send each request of a plan at its time through the client library, record what came back."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from bench.loadtest.plan import Send
from common.client import AsyncClient, FastServeError


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

    @property
    def ok(self) -> bool:
        return not self.error and self.tokens > 0


async def run_one(client: AsyncClient, send: Send, t0: float, timeout: float) -> Outcome:
    """Stream one request; every error ends up in the outcome, never as an exception."""
    clock = lambda: time.perf_counter() - t0  # noqa: E731
    sent = clock()
    first, tokens, error = 0.0, 0, ""
    try:
        async for event in client.stream(prompt_ids=list(send.prompt_ids), max_tokens=send.max_tokens,
                                         ignore_eos=True, timeout=timeout):
            if event.token_ids and not tokens:
                first = clock()
            tokens += len(event.token_ids)
    except FastServeError as e:
        error = e.code or "error"
    return Outcome(send.index, send.at_s, sent, first, clock(), len(send.prompt_ids), send.max_tokens, tokens,
                   send.warmup, error)


async def run_load(
    address: str,
    plan: Sequence[Send],
    concurrency: int = 0,
    timeout: float = 600.0,
    on_done: Callable[[Outcome], Any] | None = None,
) -> list[Outcome]:
    """Send every request at its scheduled time; `concurrency` > 0 caps requests in flight (later ones
    wait in the client, and that wait counts in their latency since arrival is the scheduled time)."""
    if concurrency < 0:
        raise ValueError(f"concurrency cap must be >= 0 (0 = none), got {concurrency}")
    gate = asyncio.Semaphore(concurrency) if concurrency else None
    async with AsyncClient(address, timeout=timeout) as client:
        await client.wait_ready(timeout=60.0)
        t0 = time.perf_counter()

        async def fire(send: Send) -> Outcome:
            delay = send.at_s - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)  # the arrival process itself, not a synchronization wait
            if gate is None:
                outcome = await run_one(client, send, t0, timeout)
            else:
                async with gate:
                    outcome = await run_one(client, send, t0, timeout)
            if on_done is not None:
                on_done(outcome)
            return outcome

        outcomes = await asyncio.gather(*(fire(s) for s in plan))
    return sorted(outcomes, key=lambda o: o.index)
