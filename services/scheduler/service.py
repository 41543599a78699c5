"""The scheduler process shell: receives jobs and results, asks the core for batches, sends them on."""

from __future__ import annotations

import time
from typing import Any, Callable

from common import sockets
from common.codec import DecodeError
from common.log import get_logger
from common.messages import (
    BatchPlanned,
    BatchResult,
    CancelJob,
    Exit,
    JobEvent,
    JobEvents,
    KVCapacity,
    KVChanged,
    Ready,
    ScheduleBatch,
    Stats,
    StatsRequest,
    SubmitJob,
)
from services.scheduler.core import SchedulerCore, Step, StepOutput, overlaps
from services.scheduler.policies import make_policy

INBOX_TYPES = (SubmitJob, CancelJob, StatsRequest, Stats, BatchPlanned, BatchResult, KVChanged, KVCapacity, Ready, Exit)


class Scheduler:
    """Inbox in; batches to the KV manager, job events to ingress. All decisions are in `core`."""

    def __init__(
        self,
        core: SchedulerCore,
        num_stages: int,
        recv_inbox: Any,
        send_to_kvcache: Any,
        send_to_ingress: Any,
        send_to_control: Any | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.core = core
        self.num_stages = num_stages
        self.recv_inbox = recv_inbox
        self.send_to_kvcache = send_to_kvcache
        self.send_to_ingress = send_to_ingress
        self.send_to_control = send_to_control
        self.clock = clock
        self.ready: set[tuple[str, int]] = set()
        self.stack_ready = False
        self.log = get_logger()
        self.handlers = {
            SubmitJob: self.on_submit,
            CancelJob: self.on_cancel,
            StatsRequest: self.on_stats_request,
            Stats: self.on_kv_stats,
            BatchPlanned: self.on_planned,
            BatchResult: self.on_result,
            KVChanged: self.on_kv_changed,
            KVCapacity: self.on_kv_capacity,
            Ready: self.on_ready,
            Exit: self.on_exit,
        }

    @classmethod
    def from_config(cls, config: Any, ctx: Any | None = None) -> "Scheduler":
        from common.model.spec import load_spec

        core = build_core(config.scheduler, config.parallel.num_stages, tuple(load_spec(config.model.path).eos_token_ids),
                          send_run_order=config.cache.swap != "defer")
        stages = config.parallel.num_stages
        ctx = ctx or sockets.context()
        ep = config.endpoints
        return cls(
            core,
            stages,
            recv_inbox=sockets.bind_inbox(ctx, ep.scheduler, ep.bind_any),
            send_to_kvcache=sockets.connect_push(ctx, ep.kvcache),
            send_to_ingress=sockets.connect_push(ctx, ep.ingress),
            send_to_control=sockets.connect_push(ctx, ep.control) if ep.control else None,
        )

    async def run(self) -> None:
        if self.send_to_control is not None:
            await sockets.send(self.send_to_control, Ready("scheduler", -1))
        self.log.info("scheduler_ready", policy=self.core.policy.name, stages=self.num_stages)
        while True:
            msg = await sockets.recv(self.recv_inbox, INBOX_TYPES)
            if isinstance(msg, DecodeError):
                self.log.warning("bad_message", code=msg.code, error=msg.message)
                continue
            await self.handlers[type(msg)](msg)
            await self.pump()

    async def pump(self) -> None:
        """Fill the pipeline: up to one batch in flight per stage."""
        while True:
            step = self.core.schedule(self.clock())
            if step is None:
                return
            batch = to_wire(step)
            await sockets.send(self.send_to_kvcache, batch)
            self.log.debug("batch_sent", batch_id=batch.batch_id, jobs=len(batch.job_ids), t=time.time())

    async def emit(self, events: list[JobEvent]) -> None:
        if not events:
            return
        for event in events:
            if event.finish_reason:
                self.log.debug("job_ended", job_id=event.job_id, reason=event.finish_reason)
        await sockets.send(self.send_to_ingress, events[0] if len(events) == 1 else JobEvents(events))

    async def on_submit(self, msg: SubmitJob) -> None:
        if msg.job_id in self.core.entries:
            self.log.warning("duplicate_submit_dropped", job_id=msg.job_id)
        self.core.submit(msg, self.clock())

    async def on_cancel(self, msg: CancelJob) -> None:
        await self.emit(self.core.cancel(msg.job_id, self.clock()))

    async def on_planned(self, msg: BatchPlanned) -> None:
        self.core.planned(msg.batch_id, msg.held_job_ids, msg.dropped_job_ids, msg.copies_in_flight)

    async def on_result(self, msg: BatchResult) -> None:
        self.log.debug("batch_result", batch_id=msg.batch_id, t=time.time())
        if msg.error:
            self.log.error("batch_failed", batch_id=msg.batch_id, error=msg.error)
        events = self.core.update(from_wire(msg), self.clock())
        await self.pump()  # the next batch goes out before the tokens: the pipeline never waits on clients
        await self.emit(events)

    async def on_kv_changed(self, msg: KVChanged) -> None:
        self.core.kv_changed(msg.copies_in_flight, msg.dropped_job_ids)

    async def on_kv_capacity(self, msg: KVCapacity) -> None:
        self.log.info("kv_capacity", device_blocks=msg.device_blocks, host_blocks=msg.host_blocks,
                      block_size=msg.block_size)
        self.core.set_capacity(msg)
        await self.pump()

    async def on_stats_request(self, msg: StatsRequest) -> None:
        await sockets.send(self.send_to_kvcache, msg)  # the KV manager answers with its counters

    async def on_kv_stats(self, msg: Stats) -> None:
        await sockets.send(self.send_to_ingress, Stats(msg.request_no, {**msg.values, **self.core.stats()}))

    async def on_ready(self, msg: Ready) -> None:
        if msg.role == "worker" and (msg.role, msg.stage) in self.ready:
            # A stage restarted with an empty device pool: batches in flight are lost. The KV manager
            # learns it through the same ordered socket as the batches, after every batch sent before.
            self.log.warning("worker_restarted", stage=msg.stage, batches_lost=len(self.core.in_flight))
            self.core.restart_pipeline()
            await sockets.send(self.send_to_kvcache, msg)
            return
        self.ready.add((msg.role, msg.stage))
        expected = {("kvcache", -1)} | {("worker", k) for k in range(self.num_stages)}
        if not self.stack_ready and expected <= self.ready:
            self.stack_ready = True
            self.log.info("stack_ready")
            await sockets.send(self.send_to_ingress, Ready("stack", -1))

    async def on_exit(self, msg: Exit) -> None:
        """A peer died (the launcher says so): every live job ends with `internal`; nothing hangs."""
        self.log.error("peer_exited", role=msg.role, stage=msg.stage, code=msg.code)
        await self.emit(self.core.fail_all("internal", f"{msg.role} {msg.stage} exited with {msg.code}", self.clock()))

    def close(self) -> None:
        for sock in (self.recv_inbox, self.send_to_kvcache, self.send_to_ingress, self.send_to_control):
            if sock is not None:
                sock.close(linger=0)


def build_core(scheduler: Any, num_stages: int, eos_token_ids: tuple[int, ...], send_run_order: bool = True,
               prefill_time: Callable[[int], float] | None = None) -> SchedulerCore:
    """The core the scheduler process runs: the configured policy (its prefill-time profile from
    `scheduler.profile` unless given) around SchedulerCore."""
    if prefill_time is None and scheduler.profile not in ("", "auto"):
        from common.profile import Profile

        prefill_time = Profile.load(scheduler.profile).prefill_time
    return SchedulerCore(make_policy(scheduler, prefill_time), num_stages, eos_token_ids, send_run_order=send_run_order,
                         overlap=overlaps(scheduler, num_stages))


def to_wire(step: Step) -> ScheduleBatch:
    return ScheduleBatch(step.batch_id, step.job_ids, step.num_new_tokens, step.context_lens, step.sampling,
                         step.input_ids, step.freed_job_ids, step.run_order, step.in_flight_job_ids, step.carry_from)


def from_wire(msg: BatchResult) -> StepOutput:
    return StepOutput(msg.batch_id, msg.job_ids, msg.token_ids, msg.compute_s, msg.error, msg.failed_job_ids,
                      msg.failure, msg.logprobs)
