"""The KV-cache manager process shell: makes each batch memory-feasible and forwards it to stage 0.

It owns the books (every device and host block, per-job block tables) and the planner; it creates (or,
restarted, maps again) the shared-memory host pool, which belongs to the stack: it outlives a worker's
restart and the manager's own. Copies run in the workers.

The books belong to one scheduler epoch. The manager hears the scheduler's heartbeat; a scheduler it has
not served yet gets fresh books (every copy in flight finished first) and the pools (KVCapacity) for its
epoch, and that scheduler sends no batch before it has them.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from common import sockets
from common.liveness import Beacon, new_epoch
from common.log import get_logger
from common.messages import (
    Alive,
    BatchPlanned,
    BatchResult,
    BatchSampling,
    Exit,
    KVCapacity,
    KVChanged,
    Ready,
    ScheduleBatch,
    StageBatch,
    Stats,
    StatsRequest,
    SwapDone,
)
from common.messages import SwapOp as WireSwapOp
from services.kvcache.books import SwapOp
from services.kvcache.planner import Planner, cut_rows

INBOX_TYPES = (ScheduleBatch, SwapDone, StatsRequest, Ready, Exit, Alive)


def wire_op(op: SwapOp) -> WireSwapOp:
    return WireSwapOp(op.op_id, op.job_id, op.direction.value, list(op.src_blocks), list(op.dst_blocks))


class KVCacheManager:
    """Inbox in; StageBatch to stage 0, BatchPlanned/KVChanged/Stats to the scheduler."""

    def __init__(
        self,
        planner: Planner,
        recv_inbox: Any,
        send_to_stage0: Any,
        send_to_scheduler: Any,
        send_to_control: Any | None = None,
        host_pool: Any | None = None,
        block_bytes: int = 0,
        epoch: int | None = None,
        beacon: tuple[str, float] = ("", 0.0),
        remove_pool: bool = False,
    ) -> None:
        # Under `fastserve up` the stack ends with any of its processes, so the pool goes with the manager
        # (and the launcher removes it too, should the manager be killed); run alone it stays for a restart.
        self.remove_pool = remove_pool
        self.epoch = epoch or new_epoch()
        self.planner = planner
        planner.reset(first_op_id=self.epoch)  # no copy id of an earlier incarnation recurs
        self.scheduler_epoch = 0  # the scheduler the books are kept for (0: none heard yet)
        self.reported_copies = 0  # copies in flight as the scheduler last heard it (BatchPlanned, KVChanged)
        address, period = beacon
        self.beacon = Beacon("kvcache", -1, self.epoch, [address] if address else [], period)
        self.block_bytes = block_bytes  # bytes of one block summed over every stage (one swap of one block)
        self.recv_inbox = recv_inbox
        self.send_to_stage0 = send_to_stage0
        self.send_to_scheduler = send_to_scheduler
        self.send_to_control = send_to_control
        self.host_pool = host_pool
        self.copy_s = 0.0  # copy seconds summed over stages, from worker acks
        self.overlap_s = 0.0  # part of copy_s that overlapped compute
        self.log = get_logger()
        self.handlers = {
            ScheduleBatch: self.on_batch,
            SwapDone: self.on_swap_done,
            StatsRequest: self.on_stats,
            Ready: self.on_worker_restart,
            Exit: self.on_exit,
            Alive: self.on_scheduler_alive,
        }

    @classmethod
    def from_config(cls, config: Any, ctx: Any | None = None) -> "KVCacheManager":
        from common.hostpool import HostPool, HostPoolError, HostPoolLayout

        layout = HostPoolLayout.from_config(config)
        host_pool = None
        if config.cache.num_host_blocks > 0 and config.cache.swap in ("proactive", "reactive"):
            try:
                host_pool = HostPool.open_for_stack(config.endpoints.host_pool, layout)
            except HostPoolError as e:
                raise SystemExit(f"fastserve kvcache: {e}") from None
        ctx = ctx or sockets.context()
        ep = config.endpoints
        return cls(
            Planner.from_config(config),
            recv_inbox=sockets.bind_inbox(ctx, ep.kvcache, ep.bind_any),
            send_to_stage0=sockets.connect_push(ctx, ep.stage(0)),
            send_to_scheduler=sockets.connect_push(ctx, ep.scheduler),
            send_to_control=sockets.connect_push(ctx, ep.control) if ep.control else None,
            host_pool=host_pool,
            block_bytes=sum(layout.block_bytes(k) for k in range(layout.num_stages)),
            beacon=(ep.scheduler, config.liveness.heartbeat_s),
            remove_pool=bool(ep.control),
        )

    def capacity(self) -> KVCapacity:
        books, swaps = self.planner.books, self.planner.mode in ("proactive", "reactive")
        return KVCapacity(books.device.num_blocks, books.host.num_blocks if swaps else 0, books.block_size,
                          self.planner.headroom, self.epoch, self.scheduler_epoch)

    async def run(self) -> None:
        for sock in (self.send_to_scheduler, self.send_to_control):
            if sock is not None:
                await sockets.send(sock, Ready("kvcache", -1, self.epoch))
        self.log.info("kvcache_ready", mode=self.planner.mode, epoch=self.epoch, **self.planner.stats())
        self.beacon.start()
        try:
            while True:
                msg = await sockets.recv_valid(self.recv_inbox, INBOX_TYPES, self.log)
                await self.handlers[type(msg)](msg)
        finally:
            self.beacon.stop()

    async def on_scheduler_alive(self, msg: Alive) -> None:
        """The scheduler's heartbeat. A new scheduler gets fresh books and the pools for its epoch; one
        that says the stack is down gets the pools again (it may have missed them)."""
        if msg.role != "scheduler" or msg.epoch < self.scheduler_epoch:
            return  # not the scheduler, or an earlier incarnation of it
        if msg.epoch > self.scheduler_epoch:
            if self.scheduler_epoch:
                # The jobs of the old scheduler are gone with it. Every copy still running on a stage
                # finishes before any batch of the new one reuses its blocks.
                await self._barrier()
                self.log.warning("scheduler_restarted", jobs_dropped=self.planner.books.num_jobs,
                                 old_epoch=self.scheduler_epoch, epoch=msg.epoch)
                self.planner.reset()
            self.scheduler_epoch = msg.epoch
            self.reported_copies = 0  # as a new scheduler starts
        elif msg.up:
            return
        await sockets.send(self.send_to_scheduler, self.capacity())  # the scheduler bounds starts by it

    async def _barrier(self) -> None:
        """A message that makes every stage finish the copies it was given before anything after it.
        (Batch id 0 is never a scheduler's: batch ids start at the scheduler's epoch.)"""
        barrier = StageBatch(0, [], [], [], [], BatchSampling([], [], [], [], []), [], [], np.zeros(0, np.int64),
                             None, 0.0, flush=True)
        await sockets.send(self.send_to_stage0, barrier)

    async def on_batch(self, msg: ScheduleBatch) -> None:
        try:
            await self.plan_batch(msg)
        except (ValueError, KeyError) as e:  # a batch the books refuse fails its jobs, never the loop
            self.log.exception("batch_refused", batch_id=msg.batch_id)
            await sockets.send(self.send_to_scheduler, BatchResult(msg.batch_id, [], [], 0.0, f"kvcache: {e}"))

    async def plan_batch(self, msg: ScheduleBatch) -> None:
        self.log.debug("batch_received", batch_id=msg.batch_id, t=time.time())
        step = self.planner.plan_step(msg.freed_job_ids, msg.job_ids, msg.context_lens, msg.num_new_tokens,
                                      msg.run_order, msg.in_flight_job_ids)
        plan, rows = step.plan, step.rows
        if step.held or plan.dropped or step.copies_in_flight != self.reported_copies:
            # otherwise the plan tells the scheduler nothing: most decode steps save it a wakeup
            self.reported_copies = step.copies_in_flight
            await sockets.send(
                self.send_to_scheduler,
                BatchPlanned(msg.batch_id, list(step.held), list(plan.dropped), step.free_blocks, step.copies_in_flight),
            )
        input_ids = cut_rows(msg.input_ids, msg.num_new_tokens, rows)
        if len(rows) == len(msg.job_ids):  # every picked job runs (most steps): the columns go on as they are
            job_ids, new, context, sampling, carry = (msg.job_ids, msg.num_new_tokens, msg.context_lens, msg.sampling,
                                                      msg.carry_from)
        else:
            job_ids = [msg.job_ids[i] for i in rows]
            new, context = [msg.num_new_tokens[i] for i in rows], [msg.context_lens[i] for i in rows]
            sampling = msg.sampling.select(rows)
            carry = [msg.carry_from[i] for i in rows] if msg.carry_from else []
        tables = plan.block_tables
        await sockets.send(
            self.send_to_stage0,
            StageBatch(
                batch_id=msg.batch_id,
                job_ids=job_ids,
                num_new_tokens=new,
                context_lens=context,
                block_tables=[tables[j] for j in job_ids],  # tuples: msgpack writes them as lists
                sampling=sampling,
                swap_out=[wire_op(op) for op in plan.swap_out],
                swap_in=[wire_op(op) for op in plan.swap_in],
                input_ids=np.ascontiguousarray(input_ids, dtype=np.int64),
                hidden=None,
                compute_s=0.0,
                carry_from=carry,
            ),
        )
        self.log.debug("batch_forwarded", batch_id=msg.batch_id, t=time.time())

    async def on_swap_done(self, msg: SwapDone) -> None:
        self.copy_s += msg.copy_s
        self.overlap_s += msg.overlap_s
        completed = []
        for op_id in msg.op_ids:
            try:
                if self.planner.ack(op_id, msg.stage):
                    completed.append(op_id)
            except (KeyError, ValueError) as e:  # an unknown op or stage (a forged or stale message): drop it
                self.log.warning("bad_swap_done", op_id=op_id, stage=msg.stage, error=str(e))
        if completed:
            await self._kv_changed([])

    async def _kv_changed(self, lost: list[int]) -> None:
        """Tell the scheduler memory changed (a copy landed, or device KV was lost)."""
        books = self.planner.books
        self.reported_copies = len(books.pending_ops())
        await sockets.send(self.send_to_scheduler, KVChanged(books.device.num_free, self.reported_copies, lost))

    async def on_stats(self, msg: StatsRequest) -> None:
        await sockets.send(self.send_to_scheduler, Stats(msg.request_no, self.stats()))

    async def on_worker_restart(self, msg: Ready) -> None:
        """A worker restarted with an empty device pool (the scheduler forwards its Ready).

        Device-side KV is gone on that stage, so the books drop it everywhere; jobs swapped out to the
        host pool keep their KV (the segment is ours and outlives the worker) and are uploaded again.
        """
        lost = self.planner.device_lost()
        self.log.warning("device_pool_lost", stage=msg.stage, jobs_to_recompute=len(lost))
        await self._barrier()  # every stage finishes the copies it still runs before the blocks are reused
        await self._kv_changed(list(lost))

    async def on_exit(self, msg: Exit) -> None:
        """The launcher says a peer died; the stack is about to stop, so there is nothing to do."""
        self.log.warning("peer_exited", role=msg.role, stage=msg.stage, code=msg.code)

    def stats(self) -> dict[str, int | float]:
        s = self.planner.stats()
        return {
            **s,
            "kv_free_blocks": s["device_blocks_free"],
            "kv_total_blocks": s["device_blocks_total"],
            "kv_whole": int(self.planner.is_whole()),
            "bytes_out": s["blocks_out"] * self.block_bytes,
            "bytes_in": s["blocks_in"] * self.block_bytes,
            "copy_s": self.copy_s,
            "copy_overlap_s": self.overlap_s,
        }

    def close(self) -> None:
        self.log.info("kvcache_stopped", **self.stats())
        for sock in (self.recv_inbox, self.send_to_stage0, self.send_to_scheduler, self.send_to_control):
            if sock is not None:
                sock.close(linger=0)
        if self.host_pool is not None:
            self.host_pool.close()
            if self.remove_pool:
                self.host_pool.remove(self.host_pool.name)
