"""Request bodies above a size limit are refused with 413 before any of them is parsed."""

from __future__ import annotations

import json
from typing import Any

from services.http.errors import ApiError

# Bytes of a refused body read and dropped before answering: closing a connection with unread data
# makes TCP reset it, and the client would then see a reset instead of the 413 (nginx's lingering
# close does the same). A body larger still is answered without reading the rest.
DRAIN_BYTES = 64 << 20


class BodyLimit:
    """ASGI middleware. The body is read here, up to the limit, and handed to the app in one piece
    (the endpoints read it whole anyway); a Content-Length over the limit is refused before reading."""

    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_bytes:
            await self._drain(receive, 0)
            await self._refuse(send)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            if size > self.max_body_bytes:
                if more:
                    await self._drain(receive, size)
                await self._refuse(send)
                return
            chunks.append(chunk)
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: http.disconnect, which streaming responses wait for

        await self.app(scope, replay, send)

    async def _drain(self, receive: Any, seen: int) -> None:
        while seen < DRAIN_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    async def _refuse(self, send: Any) -> None:
        error = ApiError(413, f"the request body is larger than {self.max_body_bytes} bytes (http.max_body_bytes)",
                         "request_too_large")
        body = json.dumps(error.body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
