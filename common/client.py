"""Client library for the FastServe protocol: AsyncClient (asyncio) and Client (blocking)."""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator

from common import codec, sockets
from common.curve import ClientKeys
from common.protocol import (
    HEARTBEAT_S,
    PROTOCOL_VERSION,
    SERVER_EVENTS,
    Cancel,
    ErrorCode,
    ErrorEvent,
    FinishEvent,
    Generate,
    Heartbeat,
    StatsQuery,
    TokenEvent,
    TokenEvents,
    TokenLogprobs,
)


class FastServeError(Exception):
    """A request ended with an error event (or timed out); `code` is the protocol's error code."""

    code = ""

    def __init__(self, message: str, request_id: str = "", code: str = "") -> None:
        super().__init__(f"{code or self.code}: {message}")
        self.code = code or self.code
        self.message = message
        self.request_id = request_id


class InvalidRequest(FastServeError):
    code = ErrorCode.INVALID_REQUEST


class ContextTooLong(FastServeError):
    code = ErrorCode.CONTEXT_TOO_LONG


class CannotFit(FastServeError):
    code = ErrorCode.CANNOT_FIT


class Overloaded(FastServeError):
    code = ErrorCode.OVERLOADED


class Unavailable(FastServeError):
    code = ErrorCode.UNAVAILABLE


class UnsupportedVersion(FastServeError):
    code = ErrorCode.UNSUPPORTED_VERSION


class RequestCancelled(FastServeError):
    code = ErrorCode.CANCELLED


class InternalError(FastServeError):
    code = ErrorCode.INTERNAL


class RequestTimeout(FastServeError):
    code = ErrorCode.TIMEOUT


_ERRORS = {cls.code: cls for cls in FastServeError.__subclasses__()}


def error_from(event: ErrorEvent) -> FastServeError:
    """The exception for an error event; unknown codes (a newer server) give a plain FastServeError."""
    cls = _ERRORS.get(event.code, FastServeError)
    return cls(event.message, event.request_id, event.code)


@dataclass(frozen=True)
class Result:
    """A finished request."""

    request_id: str
    token_ids: list[int]  # generated tokens
    text: str  # their text ("" when the model has no tokenizer)
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per token_ids entry when asked


class AsyncClient:
    """One DEALER connection to the ingress; many concurrent requests, each routed by its request id.

    Every request gets a client-chosen id (unique per connection), so replies are matched without
    ordering assumptions. `timeout` (seconds) bounds each call from send to its last event; on expiry the
    request is cancelled on the server and RequestTimeout is raised. While requests are open, a Heartbeat
    goes out every `heartbeat_s` seconds: the server cancels the requests of a client it has not heard
    from for its lease (docs/PROTOCOL.md), so those of a process that dies end soon after.
    A stack with `security.curve` on needs `keys`: `ClientKeys.load(keys_dir)`, the client keypair and
    the stack's public key (or `client_keys(config.security)`, None when CURVE is off).
    """

    def __init__(self, address: str, timeout: float = 60.0, ctx: Any | None = None,
                 heartbeat_s: float = HEARTBEAT_S, keys: ClientKeys | None = None) -> None:
        self.address = address
        self.timeout = timeout
        self.heartbeat_s = heartbeat_s
        self.keys = keys
        self._ctx = ctx
        self._sock: Any = None
        self._reader: asyncio.Task | None = None
        self._heartbeat: asyncio.Task | None = None
        self._queues: dict[str, asyncio.Queue] = {}
        self._ids = itertools.count(1)
        self._prefix = os.urandom(4).hex()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def generate(self, prompt: str | None = None, **params: Any) -> Result:
        """Run one request to the end and return everything it produced."""
        params["stream"] = False
        async for event in self._events(prompt, params):
            if isinstance(event, FinishEvent):
                return Result(event.request_id, event.token_ids, event.text, event.finish_reason,
                              event.prompt_tokens, event.completion_tokens, event.logprobs)
        raise InternalError("the request ended without a finish event")

    def stream(self, prompt: str | None = None, **params: Any) -> AsyncIterator[TokenEvent | FinishEvent]:
        """Yield TokenEvents as tokens arrive, then the FinishEvent; errors are raised.

        Parameters as in `Generate`: prompt_ids, max_tokens, temperature, top_k, top_p, seed,
        stop_token_ids, stop, ignore_eos, logprobs, request_id, plus timeout (seconds). Leaving the loop
        early cancels.
        """
        params["stream"] = True
        return self._events(prompt, params)

    async def cancel(self, request_id: str) -> None:
        """Ask the server to end a live request; its stream then raises RequestCancelled."""
        await self._connect()
        await sockets.send(self._sock, Cancel(request_id))

    async def stats(self, timeout: float | None = None) -> dict[str, int | float]:
        """The stack's counters (kv_free_blocks, kv_total_blocks, ingress_jobs_in_system, ...)."""
        request_id = self._new_id()
        deadline = self._deadline(timeout)
        queue = await self._open(request_id)
        try:
            await self._send(StatsQuery(request_id), deadline)
            event = await self._next(queue, request_id, deadline)
        finally:
            self._queues.pop(request_id, None)
        if isinstance(event, ErrorEvent):
            raise error_from(event)
        return event.values

    async def wait_ready(self, timeout: float = 30.0) -> dict[str, int | float]:
        """Poll stats until the stack answers (it says `unavailable` while starting); returns the stats."""
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            try:
                return await self.stats(timeout=max(0.01, deadline - time.monotonic()))
            except (Unavailable, RequestTimeout):
                if time.monotonic() + delay > deadline:
                    raise
            await asyncio.sleep(delay)  # a client-side retry backoff, not a process handshake
            delay = min(delay * 2, 0.5)

    async def close(self) -> None:
        for task in (self._reader, self._heartbeat):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._reader = self._heartbeat = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    # --- internals ----------------------------------------------------------------------------
    async def _events(self, prompt: str | None, params: dict[str, Any]) -> AsyncIterator[Any]:
        timeout = params.pop("timeout", None)
        request_id = params.pop("request_id", None) or self._new_id()
        request = Generate(version=PROTOCOL_VERSION, request_id=request_id, prompt=prompt, batch_events=True, **params)
        deadline = self._deadline(timeout)
        queue = await self._open(request_id)
        finished = False
        try:
            await self._send(request, deadline)
            while not finished:
                event = await self._next(queue, request_id, deadline)
                if isinstance(event, ErrorEvent):
                    finished = True
                    raise error_from(event)
                finished = isinstance(event, FinishEvent)
                yield event
        finally:
            self._queues.pop(request_id, None)
            if not finished and self._sock is not None:
                sockets.send_soon(self._sock, Cancel(request_id))  # not awaited: may run in aclose()

    async def _send(self, request: Generate | StatsQuery, deadline: float) -> None:
        """Send within the request's deadline. A send waits only while ZeroMQ cannot queue it: the pipe to
        the server is full, or gone because the server refused this client's CURVE keys (for good)."""
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await sockets.send(self._sock, request)
        except TimeoutError:
            raise RequestTimeout("could not send within the timeout (a full connection, or a server that "
                                 "refuses this client's CURVE keys)", request.request_id) from None

    async def _next(self, queue: asyncio.Queue, request_id: str, deadline: float) -> Any:
        try:
            if queue.empty():  # a timeout scope, not wait_for: no task per event on a busy stream
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    item = await queue.get()
            else:
                item = queue.get_nowait()
        except TimeoutError:
            raise RequestTimeout("no reply within the timeout", request_id) from None
        if isinstance(item, BaseException):
            raise item
        return item

    async def _open(self, request_id: str) -> asyncio.Queue:
        await self._connect()
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use on this client")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        return queue

    async def _connect(self) -> None:
        if self._sock is None:
            self._sock = sockets.connect_dealer(self._ctx or sockets.context(), self.address, self.keys)
            self._reader = asyncio.create_task(self._read())
            self._heartbeat = asyncio.create_task(self._renew_lease())

    async def _read(self) -> None:
        try:
            while True:
                event = await sockets.recv(self._sock, SERVER_EVENTS)
                if isinstance(event, codec.DecodeError):
                    continue  # nothing to route it to; a request waiting for it times out
                for one in event.events if isinstance(event, TokenEvents) else (event,):
                    queue = self._queues.get(one.request_id)
                    if queue is not None:
                        queue.put_nowait(one)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the socket broke: every waiting request learns why instead of hanging
            for queue in self._queues.values():
                queue.put_nowait(InternalError(f"connection failed: {e}"))

    async def _renew_lease(self) -> None:
        """A Heartbeat every heartbeat_s while requests are open (a timer, not a handshake: nothing answers)."""
        try:
            while True:
                await asyncio.sleep(self.heartbeat_s)
                if self._queues:
                    await sockets.send(self._sock, Heartbeat())
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the socket broke: waiting requests learn why, as from the reader
            for queue in self._queues.values():
                queue.put_nowait(InternalError(f"connection failed: {e}"))

    def _new_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (self.timeout if timeout is None else timeout)


class Client:
    """Blocking client: an AsyncClient driven by its own event loop thread."""

    def __init__(self, address: str, timeout: float = 60.0, heartbeat_s: float = HEARTBEAT_S,
                 keys: ClientKeys | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fastserve-client", daemon=True)
        self._thread.start()
        self._client = AsyncClient(address, timeout, heartbeat_s=heartbeat_s, keys=keys)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def generate(self, prompt: str | None = None, **params: Any) -> Result:
        return self._run(self._client.generate(prompt, **params))

    def stream(self, prompt: str | None = None, **params: Any) -> Iterator[TokenEvent | FinishEvent]:
        events = self._client.stream(prompt, **params)
        try:
            while True:
                try:
                    yield self._run(events.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._run(events.aclose())

    def cancel(self, request_id: str) -> None:
        self._run(self._client.cancel(request_id))

    def stats(self, timeout: float | None = None) -> dict[str, int | float]:
        return self._run(self._client.stats(timeout))

    def wait_ready(self, timeout: float = 30.0) -> dict[str, int | float]:
        return self._run(self._client.wait_ready(timeout))

    def close(self) -> None:
        if self._thread.is_alive():
            self._run(self._client.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()
