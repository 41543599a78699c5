"""The KV-cache manager over real ZeroMQ sockets with fake peers: messages it cannot match are dropped."""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import zmq
import zmq.asyncio

from common import sockets
from common.messages import Alive, BatchPlanned, BatchSampling, KVCapacity, Ready, ScheduleBatch, StageBatch, SwapDone
from services.kvcache.books import KVBooks
from services.kvcache.planner import Planner
from services.kvcache.service import KVCacheManager


def batch(batch_id: int, job_id: int, tokens: list[int]) -> ScheduleBatch:
    sampling = BatchSampling([0.0], [0], [1.0], [None], [0])
    return ScheduleBatch(batch_id, [job_id], [len(tokens)], [0], sampling, np.asarray(tokens, np.int64), [], [], [])


@contextlib.asynccontextmanager
async def manager_with_fake_peers(name: str):
    """A running KV manager (16 device, 32 host blocks of 4 tokens) whose stage 0 and scheduler are test
    sockets; yields (manager, its inbox, stage 0, the scheduler, the manager's loop)."""
    ctx = zmq.asyncio.Context()
    names = {k: f"inproc://{name}-{k}" for k in ("inbox", "stage0", "scheduler")}
    stage0 = ctx.socket(zmq.PULL)
    stage0.bind(names["stage0"])
    scheduler = ctx.socket(zmq.PULL)
    scheduler.bind(names["scheduler"])
    manager = KVCacheManager(
        Planner(KVBooks(16, 32, 4, num_stages=1), "proactive", 2, 4),
        recv_inbox=sockets.bind_inbox(ctx, names["inbox"]),
        send_to_stage0=sockets.connect_push(ctx, names["stage0"]),
        send_to_scheduler=sockets.connect_push(ctx, names["scheduler"]),
    )
    to_manager = sockets.connect_push(ctx, names["inbox"])
    loop = asyncio.ensure_future(manager.run())
    try:
        yield manager, to_manager, stage0, scheduler, loop
    finally:
        loop.cancel()
        manager.close()
        for sock in (stage0, scheduler, to_manager):
            sock.close(linger=0)
        ctx.term()


def recv(sock):
    return asyncio.wait_for(sockets.recv(sock), 10)


async def test_a_swap_done_for_an_unknown_op_or_stage_never_ends_the_loop():
    async with manager_with_fake_peers("kv") as (manager, to_manager, stage0, scheduler, loop):
        assert isinstance(await recv(scheduler), Ready)
        await sockets.send(to_manager, Alive("scheduler", -1, 7, False))  # the pools go to a scheduler's epoch
        capacity = await recv(scheduler)
        assert isinstance(capacity, KVCapacity) and capacity.device_blocks == 16 and capacity.scheduler_epoch == 7
        # a late ack from before a restart, a forged op id, a stage that does not exist
        for op_ids, stage in (([0], 0), ([12345, 7], 0), ([0], 9)):
            await sockets.send(to_manager, SwapDone(stage, op_ids, 0.001, 0.0))
        await sockets.send(to_manager, batch(1, 42, [1, 2, 3]))
        forwarded = await recv(stage0)
        assert isinstance(forwarded, StageBatch) and forwarded.job_ids == [42]
        assert not loop.done()


async def test_a_new_scheduler_epoch_gets_fresh_books_after_a_barrier():
    async with manager_with_fake_peers("kv2") as (manager, to_manager, stage0, scheduler, loop):
        assert isinstance(await recv(scheduler), Ready)
        await sockets.send(to_manager, Alive("scheduler", -1, 1000, False))
        assert (await recv(scheduler)).scheduler_epoch == 1000
        await sockets.send(to_manager, batch(1000, 42, list(range(10))))  # job 42 holds 3 blocks
        assert (await recv(stage0)).job_ids == [42]
        assert manager.planner.books.device.num_free == 13
        await sockets.send(to_manager, Alive("scheduler", -1, 999, False))  # an older incarnation: ignored
        await sockets.send(to_manager, Alive("scheduler", -1, 2000, False))  # the scheduler restarted
        capacity = await recv(scheduler)
        assert isinstance(capacity, KVCapacity) and capacity.scheduler_epoch == 2000
        barrier = await recv(stage0)
        assert isinstance(barrier, StageBatch) and barrier.flush and barrier.job_ids == []
        assert manager.planner.is_whole() and manager.planner.books.device.num_free == 16
        assert not loop.done()


async def test_the_scheduler_hears_of_a_plan_only_when_it_held_a_job_back():
    async with manager_with_fake_peers("kv3") as (manager, to_manager, stage0, scheduler, loop):
        assert isinstance(await recv(scheduler), Ready)
        await sockets.send(to_manager, Alive("scheduler", -1, 5, False))
        assert isinstance(await recv(scheduler), KVCapacity)
        await sockets.send(to_manager, batch(5, 42, list(range(40))))  # 10 of the 16 blocks: nothing held
        assert (await recv(stage0)).job_ids == [42]
        sampling = BatchSampling([0.0], [0], [1.0], [None], [0])
        # job 43 needs 10 blocks too while 42, in flight, can neither leave nor make room: held
        await sockets.send(to_manager, ScheduleBatch(6, [43], [40], [0], sampling, np.arange(40, dtype=np.int64),
                                                     [], [42, 43], [42]))
        planned = await recv(scheduler)  # the first message since the capacity: batch 5 sent none
        assert isinstance(planned, BatchPlanned) and (planned.batch_id, planned.held_job_ids) == (6, [43])
        assert (await recv(stage0)).job_ids == []
        assert not loop.done()
