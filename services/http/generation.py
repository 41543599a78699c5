"""One stack request seen as text deltas: stop strings applied, latencies observed, the job cancelled
whenever its output is no longer wanted (a stop string, the HTTP client gone, an error)."""

from __future__ import annotations

import time
from typing import AsyncIterator, Callable

import anyio

from common.client import AsyncClient, FastServeError
from common.protocol import FinishEvent
from services.http.front import Plan
from services.http.metrics import Metrics
from common.stops import StopMatcher


class Generation:
    """Drives AsyncClient.stream for one Plan. The stack always streams to the front door, even for a
    non-streaming HTTP request: stop strings must be seen as they appear, to end the job early.

    `start()` waits for the first event, so a request ingress refuses raises before any HTTP response
    starts (and gets its own status code); `deltas()` then yields the text as it is safe to show.
    """

    def __init__(self, client: AsyncClient, plan: Plan, metrics: Metrics, arrival_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.plan = plan
        self.metrics = metrics
        self.arrival_s = arrival_s  # clock() when the HTTP request arrived
        self.clock = clock
        self.stops = StopMatcher(plan.stops)
        self.finish_reason: str | None = None  # "stop" | "length" once ended normally
        self.completion_tokens = 0
        self._events = client.stream(None, prompt_ids=plan.prompt_ids, request_id=plan.request_id, **plan.params)
        self._first: object | None = None
        self._last_token_s: float | None = None
        self._done = False  # the stack's part is over (finished, failed, or cancelled by us)

    async def start(self) -> None:
        """Send the request and wait for its first event; raises FastServeError if it is refused."""
        self._first = await self._next()
        self.metrics.prompt_tokens.inc(self.plan.prompt_tokens)

    async def deltas(self) -> AsyncIterator[str]:
        """Text deltas (never a stop string) until the request ends; `finish_reason` is set after the last."""
        event = self._first
        try:
            while True:
                text = self._take(event)
                if self.stops.stopped:  # a stop string: the job's further tokens are not wanted
                    await self._cancel()
                    self._finish("stop")
                    if text:
                        yield text
                    return
                if isinstance(event, FinishEvent):
                    self._done = True
                    self._finish(event.finish_reason)
                    text += self.stops.flush()
                    if text:
                        yield text
                    return
                if text:
                    yield text
                event = await self._next()
        finally:
            await self.close()

    async def close(self) -> None:
        """End the stack's part however the consumer stopped (HTTP client gone, before or during the
        stream, or an error here): a job still running is cancelled so its KV is freed now. Idempotent."""
        if not self._done:
            await self._cancel()
            if self.finish_reason is None:
                self.metrics.request_success.labels("abort").inc()
        with anyio.CancelScope(shield=True):
            await self._events.aclose()

    async def collect(self) -> str:
        """All the text, for a non-streaming response."""
        return "".join([text async for text in self.deltas()])

    def _take(self, event: object) -> str:
        token_ids = getattr(event, "token_ids", None) or []
        if token_ids:
            now = self.clock()
            if self._last_token_s is None:
                self.metrics.ttft.observe(now - self.arrival_s)
            else:
                self.metrics.itl.observe(now - self._last_token_s)
            self._last_token_s = now
            self.completion_tokens += len(token_ids)
            self.metrics.generation_tokens.inc(len(token_ids))
        return self.stops.feed(getattr(event, "text", ""))

    async def _next(self) -> object:
        try:
            return await self._events.__anext__()
        except FastServeError:
            self._done = True  # the stack ended the request: nothing to cancel
            raise
        except StopAsyncIteration:  # the client library always ends with a FinishEvent or an error
            self._done = True
            raise RuntimeError("the stack's event stream ended without a final event") from None

    async def _cancel(self) -> None:
        """Tell ingress to end the job. Shielded: this runs while Starlette cancels a stream whose HTTP
        client left, and under anyio's cancellation every unshielded await would be cancelled again."""
        self._done = True
        with anyio.CancelScope(shield=True):
            await self.client.cancel(self.plan.request_id)

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        self.metrics.finished(reason, self.plan.prompt_tokens, self.completion_tokens, self.clock() - self.arrival_s)
