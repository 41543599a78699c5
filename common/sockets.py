"""ZeroMQ (asyncio) socket helpers: inboxes, peers, client sockets, CURVE, and sending/receiving encoded messages."""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
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


class Socket(zmq.asyncio.Socket):
    """pyzmq's asyncio socket that stops this module's watch of its descriptor before it closes, so the
    event loop can keep watching the descriptor between waits (see _Fast)."""

    def close(self, linger: int | None = None) -> None:
        fast = self.__dict__.get("_fastserve_fast")
        if fast is not None:
            fast.stop()
        super().close(linger)


class Context(zmq.asyncio.Context):
    """The asyncio context whose sockets are `Socket`s."""

    _socket_class = Socket
    _instance = None  # its own process-wide instance, not zmq.asyncio.Context's


def context() -> Context:
    """The process-wide asyncio ZeroMQ context."""
    return Context.instance()


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


# The fast path. pyzmq's asyncio sockets wait through futures: on every receive that finds nothing
# queued (in a live process, nearly every one) that is an Again exception, an io-state add and drop
# and several enum constructions. Here a message that can go out (or is already in) is sent (received)
# at once on a plain twin sharing the socket's handle, with plain int flags on pyzmq's compiled socket;
# only a call that would block waits, on the socket's descriptor (_Fast says how long it stays watched).
#
# ZeroMQ's descriptor is edge-triggered: it signals that the socket's state may have changed, and any
# call on the socket may consume that signal (the call takes in the socket's pending commands). So
# after every direct call while someone waits, the socket's events are read again and the waiters woken
# (on a DEALER one task reads while another sends: tests/component/test_sockets_fast_path.py). Reading
# ZMQ_EVENTS also resets the descriptor, so the event loop never spins on it. A socket that pyzmq's own
# futures have touched (a caller awaited its recv_multipart or poll) stays with them: a descriptor has
# one watcher.


class _Fast:
    """The plain twin of one asyncio socket, its readers waiting for a message, and the sends waiting
    for room (sent in order from the descriptor's callback).

    The descriptor of one of this module's `Socket`s stays watched from its first wait until it closes
    (its close() stops the watch first): a wait then costs no add and remove of a watcher (measured with
    bench.message_cost: about a fifth of a message's CPU back to back). Other asyncio sockets, whose
    close this module does not see, are watched only while someone waits.
    """

    __slots__ = ("sock", "plain", "fd", "readers", "queue", "loop", "permanent")

    def __init__(self, sock: Any) -> None:
        self.sock = weakref.ref(sock)  # the socket keeps its twin, not the other way round
        self.plain = zmq.Socket.shadow(sock.underlying)
        self.fd = self.plain.FD
        self.readers: list[asyncio.Future] = []
        self.queue: deque[tuple[list, bool, asyncio.Future]] = deque()  # (frames, copy, sent)
        self.loop: asyncio.AbstractEventLoop | None = None  # the loop watching the descriptor, if any
        self.permanent = isinstance(sock, Socket)

    def solo(self, sock: Any) -> bool:
        """pyzmq's futures have never run on this socket (they would watch its descriptor)."""
        return sock._current_loop is None and not sock.closed

    def take(self) -> list | None:
        """The next queued message's frames, or None when none is queued."""
        plain = self.plain
        if not _get(plain, _EVENTS) & _POLLIN:
            return None
        frame = _recv(plain, _NOBLOCK, False)
        frames = [frame]
        while frame.more:  # the rest of a multipart message is there once its first part is
            frame = _recv(plain, _NOBLOCK, False)
            frames.append(frame)
        if self.queue or self.readers:
            self._on_fd()  # the receive may have taken in the room a queued send waits for
        return frames

    def send(self, frames: list, copy: bool) -> bool:
        """Queue a message now if nothing waits before it and ZeroMQ has room; False when it has not."""
        if self.queue or not _send_now(self.plain, frames, copy):
            return False
        if self.readers or self.queue:
            self._on_fd()  # the send may have taken in the arrival a reader waits for
        return True

    async def readable(self) -> None:
        """Until a message may be queued (take() can still find none: another reader was first)."""
        arrived = self._watch().create_future()
        self.readers.append(arrived)
        try:
            await arrived
        finally:
            self.readers.remove(arrived)
            self._unwatch()

    async def send_later(self, frames: list, copy: bool) -> None:
        """Until the message is queued in ZeroMQ, behind the sends already waiting."""
        sent = self._watch().create_future()
        self.queue.append((frames, copy, sent))
        try:
            self._on_fd()  # room may have come since the direct send failed
            await sent
        finally:
            for k, (_, _, waiting) in enumerate(self.queue):
                if waiting is sent:  # cancelled while waiting: it is not sent
                    del self.queue[k]
                    break
            self._unwatch()

    def _watch(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self.loop is not loop:
            if self.loop is not None and not self.loop.is_closed():  # a watch left on another loop
                self.loop.remove_reader(self.fd)
            loop.add_reader(self.fd, self._on_fd)
            self.loop = loop
        return loop

    def _unwatch(self) -> None:
        if not self.permanent and self.loop is not None and not self.readers and not self.queue:
            self.loop.remove_reader(self.fd)
            self.loop = None

    def stop(self) -> None:
        """The socket closes: the watch ends and whoever waits on it fails."""
        error = zmq.ZMQError(zmq.ENOTSOCK)
        for _, _, sent in self.queue:
            if not sent.done():
                sent.set_exception(error)
        for arrived in self.readers:
            if not arrived.done():
                arrived.set_exception(error)
        self.queue.clear()
        if self.loop is not None and not self.loop.is_closed():
            self.loop.remove_reader(self.fd)
        self.loop = None

    def _on_fd(self) -> None:
        sock = self.sock()
        if sock is None or sock.closed:  # closed under its waiters: they fail, the watch ends
            self.stop()
            return
        plain, queue = self.plain, self.queue
        events = _get(plain, _EVENTS)
        while queue and events & _POLLOUT:
            frames, copy, sent = queue[0]
            if sent.done():  # its sender was cancelled
                queue.popleft()
                continue
            try:
                if not _send_now(plain, frames, copy):
                    break
            except zmq.ZMQError as e:  # e.g. a ROUTER's peer went away: that send fails, the rest go on
                sent.set_exception(e)
            else:
                sent.set_result(None)
            queue.popleft()
            events = _get(plain, _EVENTS)
        if events & _POLLIN:
            for arrived in self.readers:
                if not arrived.done():
                    arrived.set_result(None)


# The hot calls go to pyzmq's compiled socket with plain ints: its Python layer converts every flag and
# option to an enum (measured: 6 enum constructions per message received and sent).
_get, _recv, _send = zmq.backend.Socket.get, zmq.backend.Socket.recv, zmq.backend.Socket.send
_NOBLOCK, _SNDMORE = int(zmq.NOBLOCK), int(zmq.SNDMORE)
_EVENTS, _POLLIN, _POLLOUT = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.POLLOUT)


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


def _frames(msg: Any, envelope: tuple[bytes, ...]) -> tuple[list, bool]:
    frames = [*envelope, *codec.encode(msg)]
    # zero-copy pays only for big raw buffers; small frames are cheaper to copy (measured: ~20% per send)
    return frames, len(frames) - len(envelope) == 2


async def send(sock: Any, msg: Any, envelope: tuple[bytes, ...] = ()) -> None:
    """Send one message, waiting while ZeroMQ has no room; `envelope` is the routing identity when
    sending from a ROUTER."""
    frames, copy = _frames(msg, envelope)
    fast = _fast(sock)
    if fast is None or not fast.solo(sock):
        await sock.send_multipart(frames, copy=copy)
    elif not fast.send(frames, copy):
        await fast.send_later(frames, copy)


def try_send(sock: Any, frames: list) -> bool:
    """Queue raw frames in ZeroMQ now, or return False when it has no room (nothing is sent). Errors
    such as a ROUTER's EHOSTUNREACH (ROUTER_MANDATORY: the peer is gone) are raised."""
    fast = _fast(sock)
    if fast is not None and fast.solo(sock):
        return fast.send(frames, True)
    future = sock.send_multipart(frames, flags=zmq.NOBLOCK)
    error = future.exception() if future.done() else None
    if isinstance(error, zmq.Again):
        return False
    if error is not None:
        raise error
    return True


def send_soon(sock: Any, msg: Any) -> None:
    """Send without waiting for it: now if ZeroMQ has room, else as soon as it has (a send that must not
    wait, e.g. from a generator's cleanup)."""
    frames, copy = _frames(msg, ())
    fast = _fast(sock)
    if fast is None or not fast.solo(sock):
        sock.send_multipart(frames, copy=copy)
        return
    if fast.send(frames, copy):
        return
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # no loop runs (a finalizer at shutdown): pyzmq's socket sends on its own
        sock.send_multipart(frames, copy=copy)
        return
    asyncio.ensure_future(fast.send_later(frames, copy))


async def _recv_frames(sock: Any) -> list:
    fast = _fast(sock)
    if fast is None or not fast.solo(sock):
        return await sock.recv_multipart(copy=False)
    while True:
        frames = fast.take()
        if frames is not None:
            return frames
        await fast.readable()


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
