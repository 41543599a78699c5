"""The FastAPI app: OpenAI's completions, chat completions and models endpoints, /health and /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any, AsyncIterator, Awaitable, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.client import FastServeError
from common.log import get_logger
from services.http.errors import ApiError, from_validation
from services.http.front import FrontDoor, Plan
from services.http.generation import Delta, Generation
from services.http.limits import BodyLimit
from services.http.replies import ChatReplies, CompletionReplies, Replies, usage
from services.http.schema import ChatRequest, CompletionRequest

PROBE_TIMEOUT_S = 2.0  # /health and /metrics wait this long for ingress's stats reply
CLIENT_GONE = 499  # nginx's status for "the client closed the request"; nobody reads it
T = TypeVar("T")


class ClientGone(Exception):
    """The HTTP client disconnected before its non-streaming response was ready."""


def create_app(front: FrontDoor) -> FastAPI:
    """The app around a ready FrontDoor (a test may hand it one with a fake client)."""
    app = FastAPI(title="FastServe", summary="OpenAI-compatible front door of the FastServe stack")
    app.add_middleware(BodyLimit, max_body_bytes=front.max_body_bytes)
    log = get_logger()
    _error_handlers(app, front, log)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        plan = front.plan_completion(body)
        return await _serve(front, request, plan, CompletionReplies, arrival)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        arrival = time.monotonic()
        plan = front.plan_chat(body)
        return await _serve(front, request, plan, ChatReplies, arrival)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        m = front.model
        return {"object": "list", "data": [{"id": m.name, "object": "model", "created": m.created,
                                            "owned_by": "fastserve", "max_model_len": m.max_context}]}

    @app.get("/health")
    async def health() -> Response:
        """200 once ingress answers a stats query, which it does only when the whole stack is ready."""
        try:
            await front.client.stats(timeout=PROBE_TIMEOUT_S)
        except FastServeError as e:
            return _error(ApiError(503, f"the stack is not ready: {e.message}", e.code, "service_unavailable_error"))
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def metrics() -> Response:
        try:
            stats = await front.client.stats(timeout=PROBE_TIMEOUT_S)
        except FastServeError:
            stats = None  # fastserve:stack_up says so; the front door's own metrics are still shown
        return Response(front.metrics.render(stats), media_type=CONTENT_TYPE_LATEST)

    return app


async def _serve(front: FrontDoor, request: Request, plan: Plan, kind: type[Replies], arrival: float) -> Response:
    gen = Generation(front.client, plan, front.metrics, arrival)
    out = kind(plan.request_id, front.model.name, int(time.time()), plan.include_usage,
               front.pieces if plan.logprobs is not None else None)
    streaming = False
    try:
        if plan.stream:  # wait for the first event, so that a refused request gets its own status code
            await _unless_disconnected(request, gen.start())
            streaming = True  # from here on the response closes the generation
            return _Stream(gen, _sse(gen, out, request, front), media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        async def whole() -> Delta:
            await gen.start()
            return await gen.collect()

        result = await _unless_disconnected(request, whole())
    except FastServeError as e:
        raise ApiError.from_stack(e) from None
    except ClientGone:
        return Response(status_code=CLIENT_GONE)
    finally:
        if not streaming:
            await gen.close()
    return JSONResponse(out.full(result.text, gen.finish_reason, usage(plan.prompt_tokens, gen.completion_tokens),
                                 result.token_ids, result.logprobs))


class _Stream(StreamingResponse):
    """A streaming response that closes its Generation however it ends: a client that disconnects
    before the first chunk leaves the body generator unstarted, so its own cleanup never runs."""

    def __init__(self, gen: Generation, content: AsyncIterator[str], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.gen = gen

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.gen.close()


async def _sse(gen: Generation, out: Replies, request: Request, front: FrontDoor) -> AsyncIterator[str]:
    """Server-sent events: `data: {json}` chunks, then `data: [DONE]`. Starlette cancels this generator
    when the HTTP client disconnects; the check after each chunk catches it too, whichever comes first,
    and leaving `deltas()` either way cancels the job."""
    try:
        for chunk in out.head():
            yield _event(chunk)
        async with contextlib.aclosing(gen.deltas()) as deltas:
            async for delta in deltas:
                yield _event(out.chunk(delta.text, token_ids=delta.token_ids, logprobs=delta.logprobs))
                if await request.is_disconnected():
                    return
        yield _event(out.chunk(None, gen.finish_reason))
        if out.include_usage:
            yield _event(out.usage_chunk(usage(gen.plan.prompt_tokens, gen.completion_tokens)))
    except FastServeError as e:  # the stack failed mid-stream: the 200 is sent, so the error is an event
        front.metrics.failed(e.code)
        yield _event(ApiError.from_stack(e).body())
    yield "data: [DONE]\n\n"


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work` unless the HTTP client disconnects first (then cancel it and raise ClientGone).
    Starlette does not cancel a handler whose client left; without this a gone client's job would run on."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientGone()
    finally:
        for t in (task, gone):
            t.cancel()
        await asyncio.gather(task, gone, return_exceptions=True)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _error(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def _error_handlers(app: FastAPI, front: FrontDoor, log: Any) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        front.metrics.failed(e.code)
        if e.status >= 500:
            log.warning("request_failed", path=request.url.path, status=e.status, code=e.code, error=e.message)
        else:
            log.info("request_refused", path=request.url.path, status=e.status, code=e.code, error=e.message)
        return _error(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return await api_error(request, from_validation(list(e.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return _error(ApiError(e.status_code, str(e.detail), code))

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:  # the request's boundary: log, answer 500
        log.exception("request_crashed", path=request.url.path)
        front.metrics.failed("internal")
        return _error(ApiError(500, f"internal error: {type(e).__name__}", "internal", "server_error"))
