"""One stack request seen as deltas (text, tokens, logprobs): latencies observed, the job cancelled
whenever its output is no longer wanted (the HTTP client gone, an error). Ingress applies stop strings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import anyio

from common.client import AsyncClient, FastServeError
from common.protocol import FinishEvent, TokenLogprobs
from services.http.front import Plan
from services.http.metrics import Metrics


@dataclass
class Delta:
    """What one stack event adds: text safe to show (past stop strings), and the tokens with their logprobs."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per token when the request asked, else []

    def __iadd__(self, other: "Delta") -> "Delta":
        self.text += other.text
        self.token_ids += other.token_ids
        self.logprobs += other.logprobs
        return self


class Generation:
    """Drives AsyncClient.stream for one Plan. The stack always streams to the front door, even for a
    non-streaming HTTP request, so that a client that leaves is noticed while its job runs.

    `start()` waits for the first event, so a request ingress refuses raises before any HTTP response
    starts (and gets its own status code); `deltas()` then yields what each event adds.
    """

    def __init__(self, client: AsyncClient, plan: Plan, metrics: Metrics, arrival_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.plan = plan
        self.metrics = metrics
        self.arrival_s = arrival_s  # clock() when the HTTP request arrived
        self.clock = clock
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

    async def deltas(self) -> AsyncIterator[Delta]:
        """What each event adds, until the request ends (events that add nothing are skipped);
        `finish_reason` is set before the last one."""
        event = self._first
        try:
            while True:
                delta = self._take(event)
                if isinstance(event, FinishEvent):
                    self._done = True
                    self._finish(event.finish_reason)
                if delta.text or delta.logprobs:
                    yield delta
                if isinstance(event, FinishEvent):
                    return
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

    async def collect(self) -> Delta:
        """Everything, for a non-streaming response."""
        whole = Delta()
        async for delta in self.deltas():
            whole += delta
        return whole

    def _take(self, event: object) -> Delta:
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
        return Delta(getattr(event, "text", ""), list(token_ids), list(getattr(event, "logprobs", None) or []))

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
