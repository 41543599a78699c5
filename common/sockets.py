"""ZeroMQ (asyncio) socket helpers: inboxes, peers, client sockets, and sending/receiving encoded messages."""

from __future__ import annotations

from typing import Any

import zmq
import zmq.asyncio

from common import codec
from common.codec import DecodeError

# Every socket is made with linger=0: a process that stops never blocks on unsent messages, and tests
# that close sockets never hang. Inboxes are PULL sockets that many peers PUSH into; a process binds only
# its own inbox (and the ingress its client ROUTER) and connects to everyone else's.


def context() -> zmq.asyncio.Context:
    """The process-wide asyncio ZeroMQ context."""
    return zmq.asyncio.Context.instance()


def bind_address(address: str, bind_any: bool = False) -> str:
    """The address to bind: with bind_any, a tcp host becomes '*' (all interfaces) and the port stays."""
    if not bind_any or not address.startswith("tcp://"):
        return address
    _, port = address[len("tcp://") :].rsplit(":", 1)
    return f"tcp://*:{port}"


def bound_address(sock: zmq.Socket) -> str:
    """The address a socket actually bound (resolves a `tcp://127.0.0.1:*` wildcard port)."""
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def _socket(ctx: zmq.Context, kind: int) -> Any:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    return sock


def bind_inbox(ctx: zmq.Context, address: str, bind_any: bool = False) -> Any:
    """A PULL socket bound to this process's inbox address."""
    sock = _socket(ctx, zmq.PULL)
    sock.bind(bind_address(address, bind_any))
    return sock


def connect_push(ctx: zmq.Context, address: str) -> Any:
    """A PUSH socket connected to a peer's inbox; messages queue until the peer is up."""
    sock = _socket(ctx, zmq.PUSH)
    sock.connect(address)
    return sock


def bind_router(ctx: zmq.Context, address: str, bind_any: bool = False, max_message_bytes: int = -1) -> Any:
    """The ROUTER socket that clients' DEALER sockets connect to. With max_message_bytes > 0, ZeroMQ
    drops the connection of a peer that sends a larger frame before any of it is buffered whole."""
    sock = _socket(ctx, zmq.ROUTER)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    # A send to a full or vanished client fails (EAGAIN, EHOSTUNREACH) instead of being dropped in
    # silence at the high-water mark: services/ingress/outbox.py queues or cancels on it.
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.bind(bind_address(address, bind_any))
    return sock


def connect_dealer(ctx: zmq.Context, address: str) -> Any:
    """A client's DEALER socket connected to the ingress ROUTER."""
    sock = _socket(ctx, zmq.DEALER)
    sock.connect(address)
    return sock


# The fast path: a message that can go out (or is already queued in) is sent (received) at once on a
# plain socket sharing the asyncio socket's handle; only when ZeroMQ would block does the asyncio
# socket's future machinery run. Measured on a PUSH/PULL pair: 31 us per message through the futures,
# 9 us directly. Order is kept: a direct send is tried only while no awaited send is pending.
#
# Only one-way sockets take it: sends on PUSH, receives on PULL. ZeroMQ's descriptor is edge-triggered,
# and any call on a socket may consume the edge that announces a message; pyzmq's futures re-check the
# socket's events after each of their own calls, a direct call does not. On a DEALER that one task reads
# while another sends, a direct send could swallow the arrival of a reply and leave the reader asleep
# until some later traffic (tests/component/test_sockets_fast_path.py).


class _Fast:
    """The plain twin of one asyncio socket, and how many of its sends are awaiting room."""

    __slots__ = ("plain", "pending", "sends", "receives")

    def __init__(self, sock: Any) -> None:
        self.plain = zmq.Socket.shadow(sock.underlying)
        self.pending = 0
        kind = self.plain.type
        self.sends = kind == zmq.PUSH  # a socket that is never read
        self.receives = kind == zmq.PULL  # a socket that is never written


def _fast(sock: Any) -> _Fast | None:
    """The socket's twin (kept on the socket itself, so it lives and dies with it); None for plain sockets."""
    fast = sock.__dict__.get("_fastserve_fast")
    if fast is None and isinstance(sock, zmq.asyncio.Socket):
        fast = _Fast(sock)
        object.__setattr__(sock, "_fastserve_fast", fast)  # zmq sockets treat attributes as options
    return fast


async def send(sock: Any, msg: Any, envelope: tuple[bytes, ...] = ()) -> None:
    """Send one message; `envelope` is the routing identity when sending from a ROUTER."""
    frames = [*envelope, *codec.encode(msg)]
    # zero-copy pays only for big raw buffers; small frames are cheaper to copy (measured: ~20% per send)
    copy = len(frames) - len(envelope) == 2
    fast = _fast(sock)
    if fast is None:
        await sock.send_multipart(frames, copy=copy)
        return
    if fast.sends and not fast.pending:
        try:
            fast.plain.send_multipart(frames, flags=zmq.NOBLOCK, copy=copy)
            return
        except zmq.Again:
            pass
    fast.pending += 1
    try:
        await sock.send_multipart(frames, copy=copy)
    finally:
        fast.pending -= 1


async def _recv_frames(sock: Any) -> list:
    fast = _fast(sock)
    if fast is not None and fast.receives:
        try:
            return fast.plain.recv_multipart(flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            pass
    return await sock.recv_multipart(copy=False)


async def recv(sock: Any, expected: type | tuple[type, ...] | None = None) -> Any:
    """The next message, or the DecodeError describing why it is malformed (never raised)."""
    return decode_or_error(await _recv_frames(sock), expected)


async def recv_routed(sock: Any, expected: type | tuple[type, ...] | None = None) -> tuple[bytes, Any, list]:
    """From a ROUTER: (sender identity, message or DecodeError, raw message frames)."""
    frames = await _recv_frames(sock)
    identity, rest = frames[0].bytes, frames[1:]
    return identity, decode_or_error(rest, expected), rest


def decode_or_error(frames: list, expected: type | tuple[type, ...] | None = None) -> Any:
    """Decode frames, turning a malformed message into a DecodeError value so loops never die on input."""
    try:
        return codec.decode(frames, expected)
    except DecodeError as e:
        return e
