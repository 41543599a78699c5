"""The direct (non-future) socket calls never leave a reader asleep on a socket that is also written."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Iterator

import numpy as np
import pytest
import zmq
import zmq.asyncio

from common import sockets
from common.messages import BatchSampling, Ready, StageBatch


@pytest.fixture(params=[zmq.asyncio.Context, sockets.Context], ids=["pyzmq-context", "fastserve-context"])
def Context(request):
    """pyzmq's asyncio context (its descriptor watched only while someone waits) and this project's own
    (its sockets' descriptors stay watched until they close)."""
    return request.param


@contextlib.contextmanager
def _pair(Context: type, narrow: bool = False) -> Iterator[tuple]:
    """A connected PUSH and PULL, closed afterwards. Narrow: inproc (no kernel buffer between them)
    with high-water marks of 1, so only a few messages fit in flight."""
    ctx = Context()
    if narrow:
        pull = ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        pull.setsockopt(zmq.RCVHWM, 1)
        pull.bind(f"inproc://narrow-{id(ctx)}")
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.setsockopt(zmq.SNDHWM, 1)
        push.connect(sockets.bound_address(pull))
    else:
        pull = sockets.bind_inbox(ctx, "tcp://127.0.0.1:*")
        push = sockets.connect_push(ctx, sockets.bound_address(pull))
    try:
        yield push, pull
    finally:
        for sock in (push, pull):
            sock.close(linger=0)
        ctx.term()


def _idle_watch(fast: sockets._Fast, loop: asyncio.AbstractEventLoop) -> bool:
    """With nobody waiting, the descriptor is watched exactly when the socket keeps its watch."""
    return fast.loop is (loop if fast.permanent else None)


async def test_a_send_on_a_dealer_never_swallows_the_wakeup_of_its_reader(Context):
    ctx = Context()
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
        assert sockets._fast(dealer).solo(dealer) and sockets._fast(router).solo(router)  # the direct path ran
    finally:
        for sock in (dealer, router):
            sock.close(linger=0)
        ctx.term()


async def test_push_and_pull_take_the_direct_path_and_keep_order(Context):
    with _pair(Context) as (push, pull):
        for k in range(200):
            await sockets.send(push, Ready("worker", k))
        got = [await asyncio.wait_for(sockets.recv(pull), 5) for _ in range(200)]
        assert [m.stage for m in got] == list(range(200))
        assert sockets._fast(push).solo(push) and sockets._fast(pull).solo(pull)  # pyzmq's futures never ran


def _stage_batch(k: int) -> StageBatch:
    """A message of three frames: type, payload and the input ids' raw buffer."""
    return StageBatch(k, [k], [3], [0], [[0]], BatchSampling([0.0], [0], [1.0], [None], [0], [0]), [], [],
                      np.arange(k, k + 3, dtype=np.int64), None, 0.0)


async def test_a_pull_socket_sleeps_on_its_descriptor_and_wakes_for_every_message(Context):
    loop = asyncio.get_running_loop()
    with _pair(Context) as (push, pull):
        for k in range(30):
            reader = asyncio.ensure_future(sockets.recv(pull))
            await asyncio.sleep(0.005)  # the reader is asleep: nothing is queued
            assert not reader.done()
            await sockets.send(push, _stage_batch(k))
            got = await asyncio.wait_for(reader, 2)
            assert got.batch_id == k and got.input_ids.tolist() == [k, k + 1, k + 2]
        for k in range(50):  # a burst: every message of several frames comes whole and in order
            await sockets.send(push, _stage_batch(k))
        got = [await asyncio.wait_for(sockets.recv(pull), 2) for _ in range(50)]
        assert [m.batch_id for m in got] == list(range(50))
        assert _idle_watch(sockets._fast(pull), loop)


async def test_a_cancelled_receive_stops_watching_the_socket(Context):
    loop = asyncio.get_running_loop()
    with _pair(Context) as (push, pull):
        reader = asyncio.ensure_future(sockets.recv(pull))
        await asyncio.sleep(0.01)
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        assert _idle_watch(sockets._fast(pull), loop)
        await sockets.send(push, Ready("worker", 7))  # the next receive still gets what comes
        assert (await asyncio.wait_for(sockets.recv(pull), 2)).stage == 7


async def test_a_pull_socket_that_pyzmq_already_watches_is_read_through_its_futures(Context):
    with _pair(Context) as (push, pull):
        assert not await pull.poll(timeout=20, flags=zmq.POLLIN)  # pyzmq now watches the descriptor
        for k in range(5):
            reader = asyncio.ensure_future(sockets.recv(pull))
            await asyncio.sleep(0.005)
            await sockets.send(push, Ready("worker", k))
            assert (await asyncio.wait_for(reader, 2)).stage == k


async def test_sends_that_wait_for_room_go_out_in_order_and_the_watch_ends(Context):
    with _pair(Context, narrow=True) as (push, pull):
        senders = [asyncio.ensure_future(sockets.send(push, Ready("worker", k))) for k in range(300)]
        await asyncio.sleep(0.05)
        fast = sockets._fast(push)
        assert fast.queue  # the pipe is full: sends wait
        got = [(await asyncio.wait_for(sockets.recv(pull), 5)).stage for _ in range(300)]
        assert got == list(range(300))
        await asyncio.wait_for(asyncio.gather(*senders), 5)
        assert not fast.queue and _idle_watch(fast, asyncio.get_running_loop()) and fast.solo(push)


async def test_a_send_cancelled_while_it_waits_is_never_sent(Context):
    with _pair(Context, narrow=True) as (push, pull):
        k = 0
        while sockets._fast(push).send(*sockets._frames(Ready("worker", k), ())):  # fill the pipe
            k += 1
        cancelled = asyncio.ensure_future(sockets.send(push, Ready("worker", -7)))
        await asyncio.sleep(0.02)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        after = asyncio.ensure_future(sockets.send(push, Ready("worker", k)))
        got = [(await asyncio.wait_for(sockets.recv(pull), 5)).stage for _ in range(k + 1)]
        await asyncio.wait_for(after, 5)
        assert got == list(range(k + 1))  # everything but the cancelled one, in order
        assert not await pull.poll(timeout=50, flags=zmq.POLLIN)


async def test_closing_a_socket_ends_its_watch_and_fails_its_waiting_reader():
    loop = asyncio.get_running_loop()
    with _pair(sockets.Context) as (push, pull):
        await sockets.send(push, Ready("worker", 1))
        assert (await asyncio.wait_for(sockets.recv(pull), 2)).stage == 1
        fast = sockets._fast(pull)
        assert fast.permanent and fast.loop is loop  # kept between waits
        reader = asyncio.ensure_future(sockets.recv(pull))
        await asyncio.sleep(0.01)
        pull.close(linger=0)
        with pytest.raises(zmq.ZMQError) as failed:
            await asyncio.wait_for(reader, 2)
        assert failed.value.errno == zmq.ENOTSOCK
        assert fast.loop is None and not fast.readers


async def test_a_watched_socket_left_idle_does_not_spin_the_loop():
    """The kept watch is level-triggered: were the descriptor left readable, the loop would call back
    without end. Reading ZMQ_EVENTS in the callback resets it, so an idle watched socket costs nothing."""
    ctx = sockets.Context()
    router = sockets.bind_router(ctx, "tcp://127.0.0.1:*")
    dealer = sockets.connect_dealer(ctx, sockets.bound_address(router))
    try:
        reader = asyncio.ensure_future(sockets.recv(dealer))  # the client's reader, always waiting
        for k in range(20):
            await sockets.send(dealer, Ready("client", k))
            identity, _, _ = await asyncio.wait_for(sockets.recv_routed(router), 5)
            await asyncio.sleep(0.002)
        await sockets.send(router, Ready("reply", -1), envelope=(identity,))
        assert await asyncio.wait_for(reader, 5) == Ready("reply", -1)
        reader = asyncio.ensure_future(sockets.recv(dealer))
        assert sockets._fast(dealer).loop is not None and sockets._fast(router).loop is not None
        start = time.process_time()
        await asyncio.sleep(0.5)
        assert time.process_time() - start < 0.1  # a spinning loop would take about the whole 0.5 s
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    finally:
        for sock in (dealer, router):
            sock.close(linger=0)
        ctx.term()
