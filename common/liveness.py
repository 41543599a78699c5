"""Liveness between the processes of a stack: epochs, heartbeats, and who is up.

Every process has an epoch, the wall clock in microseconds when it started: a restarted process has a
larger one, and it also seeds the ids a process hands out (ingress job ids, scheduler batch ids, KV copy
op ids), so no id of an old incarnation is ever mistaken for one of the new (a stale message names an
unknown id and is dropped).

Heartbeats (`Alive`) go out from a thread with its own sockets, so a long iteration in a worker's loop
never makes it look dead; a process that dies stops them. The receiver keeps a `Peers` table: a peer
whose heartbeats stop for `timeout_s` is down, one that comes back with a new epoch restarted. Who
heartbeats to whom, and what each side does about it, is in docs/DEPLOY.md ("Liveness").
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

import zmq

from common import codec, sockets
from common.messages import Alive

Key = tuple[str, int]  # (role, stage)


def new_epoch() -> int:
    """This process's epoch: microseconds of wall clock now (larger than any earlier incarnation's)."""
    return time.time_ns() // 1000


class Beacon:
    """Sends `Alive(role, stage, epoch, *state())` to every address, every `period_s`, from a daemon thread;
    `state` gives the scheduler's (up, changes)."""

    def __init__(self, role: str, stage: int, epoch: int, addresses: list[str], period_s: float,
                 state: Callable[[], tuple[bool, int]] = lambda: (True, 0)) -> None:
        self.role, self.stage, self.epoch = role, stage, epoch
        self.addresses = addresses
        self.period_s = period_s
        self.state = state
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"beacon-{role}", daemon=True)

    def start(self) -> "Beacon":
        if self.addresses and self.period_s > 0:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self.period_s + 1)

    def beat(self) -> Alive:
        up, changes = self.state()
        return Alive(self.role, self.stage, self.epoch, up, changes)

    def _run(self) -> None:
        ctx = zmq.Context.instance()  # a plain context of its own: this thread never touches asyncio sockets
        socks = [sockets.connect_push(ctx, address) for address in self.addresses]
        try:
            for sock in socks:
                sock.setsockopt(zmq.SNDHWM, 4)  # heartbeats to a peer that is down must not pile up
            while not self._stop.is_set():
                frames = codec.encode(self.beat())
                for sock in socks:
                    try:
                        sock.send_multipart(frames, flags=zmq.NOBLOCK)
                    except zmq.Again:
                        pass  # the peer is down and its queue is full; the next beat says the same
                self._stop.wait(self.period_s)
        finally:
            for sock in socks:
                sock.close(linger=0)


@dataclass
class _Peer:
    epoch: int
    heard: float  # monotonic seconds
    up: bool = True  # its own word (the scheduler's `up`), as last heard
    changes: int = 0  # the count that came with `up`
    alive: bool = True  # heard within the timeout


class Peers:
    """Which peers are alive, by their heartbeats. Pure: the caller passes the clock."""

    def __init__(self, timeout_s: float, expected: set[Key] = frozenset()) -> None:
        self.timeout_s = timeout_s
        self.expected = set(expected)
        self.peers: dict[Key, _Peer] = {}

    def heard(self, msg: Alive, now: float) -> str:
        """Record a heartbeat; returns "new" (first heard), "restarted" (a larger epoch), "back" (alive
        again after a silence, same epoch), "stale" (an older epoch: dropped) or "same"."""
        key = (msg.role, msg.stage)
        peer = self.peers.get(key)
        if peer is None:
            self.peers[key] = _Peer(msg.epoch, now, msg.up, msg.changes)
            return "new"
        if msg.epoch < peer.epoch:
            return "stale"
        was_alive = peer.alive
        restarted = msg.epoch > peer.epoch
        if restarted or msg.changes >= peer.changes:  # a late heartbeat still says "alive", not its `up`
            peer.up, peer.changes = msg.up, msg.changes
        peer.epoch, peer.heard, peer.alive = msg.epoch, now, True
        if restarted:
            return "restarted"
        return "same" if was_alive else "back"

    def expire(self, now: float) -> list[Key]:
        """Peers whose heartbeats stopped for the timeout, each returned once when it goes silent."""
        gone = []
        for key, peer in self.peers.items():
            if peer.alive and now - peer.heard > self.timeout_s:
                peer.alive = False
                gone.append(key)
        return gone

    def epoch(self, key: Key) -> int:
        peer = self.peers.get(key)
        return peer.epoch if peer is not None else 0

    def up(self, key: Key) -> bool:
        """The peer's own latest word on whether the stack is up (heartbeats out of order are sorted)."""
        peer = self.peers.get(key)
        return peer is not None and peer.alive and peer.up

    def alive(self, key: Key) -> bool:
        peer = self.peers.get(key)
        return peer is not None and peer.alive

    def all_alive(self) -> bool:
        return all(self.alive(key) for key in self.expected)

    def missing(self) -> list[Key]:
        return sorted(key for key in self.expected if not self.alive(key))

    def ages(self, now: float) -> dict[str, float]:
        """Seconds since each peer was last heard (for stats)."""
        return {name(key): round(now - peer.heard, 3) for key, peer in self.peers.items()}


def name(key: Key) -> str:
    role, stage = key
    return role if stage < 0 else f"{role}{stage}"
