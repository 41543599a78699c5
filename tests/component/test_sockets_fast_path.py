"""The direct (non-future) socket calls never leave a reader asleep on a socket that is also written."""

from __future__ import annotations

import asyncio
import time

import zmq
import zmq.asyncio

from common import sockets
from common.messages import Ready


async def test_a_send_on_a_dealer_never_swallows_the_wakeup_of_its_reader():
    ctx = zmq.asyncio.Context()
    router = sockets.bind_router(ctx, "tcp://127.0.0.1:*")
    dealer = sockets.connect_dealer(ctx, sockets.bound_address(router))
    try:
        await sockets.send(dealer, Ready("client", -1))
        identity, _, _ = await asyncio.wait_for(sockets.recv_routed(router), 5)
        for _ in range(20):
            reader = asyncio.ensure_future(sockets.recv(dealer))
            await asyncio.sleep(0.01)  # the reader waits on the dealer's descriptor
            await sockets.send(router, Ready("reply", -1), envelope=(identity,))
            time.sleep(0.02)  # the reply reaches the dealer's queue while the loop does not run
            await sockets.send(dealer, Ready("client", -1))  # must not consume the reply's wakeup
            got = await asyncio.wait_for(reader, 2)
            assert got == Ready("reply", -1)
            await asyncio.wait_for(sockets.recv_routed(router), 5)
    finally:
        for sock in (dealer, router):
            sock.close(linger=0)
        ctx.term()


async def test_push_and_pull_take_the_direct_path_and_keep_order():
    ctx = zmq.asyncio.Context()
    pull = sockets.bind_inbox(ctx, "tcp://127.0.0.1:*")
    push = sockets.connect_push(ctx, sockets.bound_address(pull))
    try:
        for k in range(200):
            await sockets.send(push, Ready("worker", k))
        got = [await asyncio.wait_for(sockets.recv(pull), 5) for _ in range(200)]
        assert [m.stage for m in got] == list(range(200))
        assert sockets._fast(push).sends and sockets._fast(pull).receives
    finally:
        for sock in (push, pull):
            sock.close(linger=0)
        ctx.term()
