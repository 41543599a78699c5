"""Events to clients: never dropped in silence, and one client that does not read never stalls the rest.

Design note: the client ROUTER runs with ROUTER_MANDATORY, so a send to a client whose pipe is full
fails (EAGAIN) instead of being dropped at the high-water mark, and a send to a client that went away
fails (EHOSTUNREACH). Every send is non-blocking: a full client gets a backlog, kept in order and
retried while the loop runs; other clients are served meanwhile. A backlog older than `stall_s` marks
the client as not reading: its requests are cancelled (the caller decides how) and its backlog keeps
only final events, so memory stays bounded by its requests while every final event is still kept for
it. A client that went away loses what was queued for it; its requests are cancelled too.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable

import zmq

from common import codec, sockets

FINAL_TYPES = (9, 10)  # FinishEvent, ErrorEvent (docs/PROTOCOL.md)


class ClientOutbox:
    def __init__(self, sock: Any, stall_s: float, on_lost: Callable[[bytes, str], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sock = sock
        self.stall_s = stall_s
        self.on_lost = on_lost  # (client identity, why): cancel that client's requests
        self.clock = clock
        self.backlog: dict[bytes, deque[list[bytes]]] = {}
        self.since: dict[bytes, float] = {}  # when the oldest queued event of a client was queued
        self.stalled: set[bytes] = set()  # clients already reported as not reading
        self.counters = {"client_events_queued": 0, "clients_stalled": 0, "client_events_to_gone": 0}

    def send(self, identity: bytes, msg: Any) -> None:
        frames = [identity, *codec.encode(msg)]
        queue = self.backlog.get(identity)
        if queue is not None:  # keep the order: behind what is already waiting
            self._queue(identity, queue, frames)
            return
        outcome = self._try(frames)
        if outcome == "full":
            self.backlog[identity] = deque([frames])
            self.since[identity] = self.clock()
            self.counters["client_events_queued"] += 1
        elif outcome == "gone":
            self._gone(identity)

    def flush(self) -> None:
        """Retry every backlog in order; report clients that have not read for stall_s."""
        now = self.clock()
        for identity in list(self.backlog):
            queue = self.backlog[identity]
            while queue:
                outcome = self._try(queue[0])
                if outcome == "full":
                    break
                if outcome == "gone":
                    self._gone(identity)
                    break
                queue.popleft()
                self.since[identity] = now
            if identity in self.backlog and not self.backlog[identity]:
                del self.backlog[identity], self.since[identity]
                self.stalled.discard(identity)
            elif identity in self.backlog and now - self.since[identity] >= self.stall_s and identity not in self.stalled:
                self.stalled.add(identity)
                self.counters["clients_stalled"] += 1
                self.backlog[identity] = deque(f for f in queue if _is_final(f))
                self.on_lost(identity, f"the client read nothing for {self.stall_s:g} s")

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self.backlog.values())

    def _queue(self, identity: bytes, queue: deque, frames: list[bytes]) -> None:
        if identity in self.stalled and not _is_final(frames):
            return  # a client that stopped reading gets its final events only
        queue.append(frames)
        self.counters["client_events_queued"] += 1

    def _try(self, frames: list[bytes]) -> str:
        try:
            return "sent" if sockets.try_send(self.sock, frames) else "full"
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                return "gone"
            raise

    def _gone(self, identity: bytes) -> None:
        self.backlog.pop(identity, None)
        self.since.pop(identity, None)
        self.stalled.discard(identity)
        self.counters["client_events_to_gone"] += 1
        self.on_lost(identity, "the client went away")


def _is_final(frames: list[bytes]) -> bool:
    return frames[1][0] in FINAL_TYPES  # frames = [identity, type byte, payload, ...]
