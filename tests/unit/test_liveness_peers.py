"""Peers: who is alive by their heartbeats, restarts by epoch, and late heartbeats sorted by their count."""

from __future__ import annotations

from common.liveness import Beacon, Peers
from common.messages import Alive

W0, KV = ("worker", 0), ("kvcache", -1)


def test_silence_restart_and_stale_epochs():
    peers = Peers(timeout_s=3.0, expected={W0, KV})
    assert peers.heard(Alive("worker", 0, 100), 0.0) == "new"
    assert not peers.all_alive() and peers.missing() == [KV]
    assert peers.heard(Alive("kvcache", -1, 50), 0.0) == "new" and peers.all_alive()
    assert peers.heard(Alive("worker", 0, 100), 2.0) == "same"
    assert peers.expire(4.0) == [KV]  # unheard since 0.0
    assert peers.expire(4.5) == []  # reported once
    assert peers.expire(5.5) == [W0]
    assert peers.heard(Alive("worker", 0, 99), 6.0) == "stale" and not peers.alive(W0)  # an earlier incarnation
    assert peers.heard(Alive("worker", 0, 100), 6.0) == "back"
    assert peers.heard(Alive("kvcache", -1, 60), 6.0) == "restarted" and peers.epoch(KV) == 60
    assert peers.all_alive()


def test_a_late_heartbeat_keeps_the_peer_alive_but_not_its_old_word():
    peers = Peers(timeout_s=3.0, expected={("scheduler", -1)})
    key = ("scheduler", -1)
    peers.heard(Alive("scheduler", -1, 7, True, 1), 0.0)
    peers.heard(Alive("scheduler", -1, 7, False, 2), 0.1)  # the stack went down
    peers.heard(Alive("scheduler", -1, 7, True, 1), 0.2)  # a beat sent before that, delivered after
    assert peers.alive(key) and not peers.up(key)
    peers.heard(Alive("scheduler", -1, 7, True, 3), 0.3)
    assert peers.up(key)


def test_a_beacon_without_addresses_or_period_sends_nothing_and_stops():
    beacon = Beacon("worker", 1, 5, [], 0.5).start()
    assert beacon.beat() == Alive("worker", 1, 5, True, 0)
    beacon.stop()
