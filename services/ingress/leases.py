"""Client leases (pure): a connection that sends nothing for `lease_s` is taken as dead.

Design note: a client that dies without cancelling leaves no trace ZeroMQ reports to the ROUTER, and a
non-streaming request has no event to send until its end (a send to a vanished client is how the outbox
notices one), so without a lease its job would run to max_tokens. Every client message renews the
lease; a client with requests in flight and nothing else to say sends a Heartbeat. Expired clients are
forgotten here: their next message starts a new lease. Time in which ingress itself did not run (a gap
of more than half a lease between two sweeps) does not count against clients: their heartbeats were
waiting unread in the socket.
"""

from __future__ import annotations


class Leases:
    def __init__(self, lease_s: float) -> None:
        self.lease_s = lease_s  # seconds of silence after which a client is taken as dead
        self._heard: dict[bytes, float] = {}  # client identity -> when its last message arrived (insertion = age order)
        self._swept: float | None = None  # when expired() last ran
        self._asleep = 0.0  # seconds ingress did not run, added to every heard time (one shift for all)

    def heard(self, identity: bytes, now: float) -> None:
        """A message from this client arrived at `now` (seconds, any monotonic clock)."""
        self._heard.pop(identity, None)  # re-inserted last: the dict stays ordered oldest first
        self._heard[identity] = now - self._asleep

    def expired(self, now: float) -> list[bytes]:
        """Clients silent for lease_s or longer, oldest first; each is reported once."""
        if self._swept is not None and now - self._swept > self.lease_s / 2:
            self._asleep += now - self._swept  # ingress was not running: nobody could be heard
        self._swept = now
        out = []
        for identity, at in self._heard.items():
            if now - self._asleep - at < self.lease_s:
                break  # the rest were heard later
            out.append(identity)
        for identity in out:
            del self._heard[identity]
        return out

    def __len__(self) -> int:
        return len(self._heard)
