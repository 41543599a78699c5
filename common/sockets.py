"""ZeroMQ (asyncio) socket helpers: inboxes, peers, client sockets, CURVE, and sending/receiving encoded messages."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio
import zmq.backend

from common import codec, curve
from common.codec import DecodeError
from common.config import ConfigError, SecurityConfig

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


# CURVE (security.curve) is a process-wide choice, made once by secure() before any socket: off, every
# socket is plain; on, every bound socket is a CURVE server presenting the stack keypair, whose ZAP domain
# says which client keys it accepts (common/curve.py), and every connecting socket a CURVE client.
# ZAP_ENFORCE_DOMAIN makes a server that no authenticator answers for refuse every peer; libzmq would
# otherwise let any key in.


@dataclass(frozen=True)
class _Secured:
    keys: curve.StackKeys
    ctx: zmq.Context  # the context the authenticator answers for: CURVE servers must be made in it
    auth: Any  # zmq.auth.thread.ThreadAuthenticator


_secured: _Secured | None = None


def secure(security: SecurityConfig) -> None:
    """Make the sockets this process makes from now on CURVE (config [security] curve = true) or plain."""
    global _secured
    if _secured is not None:
        _secured.auth.stop()
        _secured = None
    if security.curve:
        keys = curve.StackKeys.load(security.keys_dir)
        ctx = context()
        _secured = _Secured(keys, ctx, curve.start_authenticator(ctx, keys))


def _socket(ctx: zmq.Context, kind: int) -> Any:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    return sock


def _server(ctx: zmq.Context, kind: int, domain: str) -> Any:
    """A socket to bind; secured, a CURVE server whose ZAP domain picks the client keys it accepts."""
    if _secured is None:
        return _socket(ctx, kind)
    if ctx is not _secured.ctx:
        raise RuntimeError("with security.curve on, bind sockets in sockets.context(): its authenticator checks keys")
    own = _secured.keys.internal()
    sock = _socket(ctx, kind)
    sock.curve_server = True
    sock.curve_publickey, sock.curve_secretkey = own.public, own.secret
    sock.setsockopt_string(zmq.ZAP_DOMAIN, domain)
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    return sock


def _connect_as(sock: Any, keys: curve.ClientKeys | None) -> None:
    """Before connect: a CURVE client with these keys (None: plain)."""
    if keys is not None:
        sock.curve_serverkey = keys.server
        sock.curve_publickey, sock.curve_secretkey = keys.public, keys.secret


def _dealer_keys() -> curve.ClientKeys | None:
    """A DEALER's keys when its caller gives none: the process's client keypair when secured."""
    if _secured is None:
        return None
    if _secured.keys.client is None:
        raise ConfigError(f"security.curve is on and this process connects as a client, but its keys directory has "
                          f"no {curve.CLIENT}{curve.SECRET}; give it the client keypair")
    return _secured.keys.client


def bind_inbox(ctx: zmq.Context, address: str, bind_any: bool = False) -> Any:
    """A PULL socket bound to this process's inbox address; secured, it accepts the stack key only."""
    sock = _server(ctx, zmq.PULL, curve.STACK_DOMAIN)
    sock.bind(bind_address(address, bind_any))
    return sock


def connect_push(ctx: zmq.Context, address: str) -> Any:
    """A PUSH socket connected to a peer's inbox; messages queue until the peer is up."""
    keys = _secured.keys.internal() if _secured else None
    sock = _socket(ctx, zmq.PUSH)
    _connect_as(sock, keys)
    sock.connect(address)
    return sock


def bind_router(ctx: zmq.Context, address: str, bind_any: bool = False, max_message_bytes: int = -1) -> Any:
    """The ROUTER socket that clients' DEALER sockets connect to. With max_message_bytes > 0, ZeroMQ
    drops the connection of a peer that sends a larger frame before any of it is buffered whole.
    Secured, it accepts the client keys and the stack key."""
    sock = _server(ctx, zmq.ROUTER, curve.CLIENT_DOMAIN)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    # A send to a full or vanished client fails (EAGAIN, EHOSTUNREACH) instead of being dropped in
    # silence at the high-water mark: services/ingress/outbox.py queues or cancels on it.
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.bind(bind_address(address, bind_any))
    return sock


def connect_dealer(ctx: zmq.Context, address: str, keys: curve.ClientKeys | None = None) -> Any:
    """A client's DEALER socket connected to the ingress ROUTER; CURVE with `keys`, or with the process's
    client keypair when secured."""
    keys = keys or _dealer_keys()
    sock = _socket(ctx, zmq.DEALER)
    _connect_as(sock, keys)
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

    __slots__ = ("plain", "pending", "sends", "receives", "fd")

    def __init__(self, sock: Any) -> None:
        self.plain = zmq.Socket.shadow(sock.underlying)
        self.pending = 0
        kind = self.plain.type
        self.sends = kind == zmq.PUSH  # a socket that is never read
        self.receives = kind == zmq.PULL  # a socket that is never written
        self.fd = self.plain.FD if self.receives else -1

    def take(self) -> list | None:
        """The next queued message's frames, or None when none is queued."""
        plain = self.plain
        if not _get(plain, _EVENTS) & _POLLIN:
            return None
        frames = [_recv(plain, _NOBLOCK, False)]
        while _get(plain, _RCVMORE):  # the rest of a multipart message is there once its first part is
            frames.append(_recv(plain, _NOBLOCK, False))
        return frames

    async def readable(self) -> None:
        """Until a message is queued. The event loop watches the socket's descriptor only while this
        waits: reading ZMQ_EVENTS in the callback resets the descriptor, so the loop never spins on it."""
        loop = asyncio.get_running_loop()
        arrived = loop.create_future()
        loop.add_reader(self.fd, self._wake, arrived)
        try:
            await arrived
        finally:
            loop.remove_reader(self.fd)

    def _wake(self, arrived: asyncio.Future) -> None:
        if not arrived.done() and _get(self.plain, _EVENTS) & _POLLIN:
            arrived.set_result(None)


# The hot calls go to pyzmq's compiled socket with plain ints: its Python layer converts every flag and
# option to an enum (measured: 6 enum constructions per message received and sent).
_get, _recv, _send = zmq.backend.Socket.get, zmq.backend.Socket.recv, zmq.backend.Socket.send
_NOBLOCK, _SNDMORE = int(zmq.NOBLOCK), int(zmq.SNDMORE)
_EVENTS, _POLLIN, _RCVMORE = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.RCVMORE)


def _send_now(plain: Any, frames: list, copy: bool) -> bool:
    """Queue a whole message without blocking; False (nothing queued) when ZeroMQ would block. Once the
    first part is queued ZeroMQ takes the rest of the message whatever the high-water mark."""
    last = len(frames) - 1
    try:
        _send(plain, frames[0], _NOBLOCK | _SNDMORE if last else _NOBLOCK, copy)
    except zmq.Again:
        return False
    for k in range(1, last + 1):
        _send(plain, frames[k], _NOBLOCK | _SNDMORE if k < last else _NOBLOCK, copy)
    return True


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
    if fast.sends and not fast.pending and _send_now(fast.plain, frames, copy):
        return
    fast.pending += 1
    try:
        await sock.send_multipart(frames, copy=copy)
    finally:
        fast.pending -= 1


async def _recv_frames(sock: Any) -> list:
    fast = _fast(sock)
    # A PULL socket is read here alone, unless pyzmq's own futures already watch it (a caller awaited
    # its recv or poll): then they do the waiting, as the descriptor can have one watcher.
    if fast is not None and fast.receives and sock._current_loop is None:
        while True:
            frames = fast.take()
            if frames is not None:
                return frames
            await fast.readable()
    return await sock.recv_multipart(copy=False)


async def recv(sock: Any, expected: type | tuple[type, ...] | None = None) -> Any:
    """The next message, or the DecodeError describing why it is malformed (never raised)."""
    return decode_or_error(await _recv_frames(sock), expected)


async def recv_valid(sock: Any, expected: type | tuple[type, ...], log: Any, event: str = "bad_message") -> Any:
    """The next well-formed message of an inbox; malformed ones are logged (`event`) and skipped, so no input
    ever ends the loop that reads it."""
    while True:
        msg = await recv(sock, expected)
        if not isinstance(msg, DecodeError):
            return msg
        log.warning(event, code=msg.code, error=msg.message)


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
