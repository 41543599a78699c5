"""The scheduler process shell: receives jobs and results, asks the core for batches, sends them on."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

from common import sockets
from common.liveness import Beacon, Peers, name, new_epoch
from common.log import get_logger
from common.messages import (
    Alive,
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
from services.scheduler.iterlog import IterationLog
from services.scheduler.policies import make_policy

INBOX_TYPES = (SubmitJob, CancelJob, StatsRequest, Stats, BatchPlanned, BatchResult, KVChanged, KVCapacity, Ready, Exit,
               Alive)
KVCACHE = ("kvcache", -1)
INGRESS = ("ingress", -1)


class Scheduler:
    """Inbox in; batches to the KV manager, job events to ingress. All decisions are in `core`.

    The scheduler is the hub of liveness: the KV manager, every worker and ingress heartbeat to it, and
    its own heartbeat tells ingress and the KV manager whether the stack is up (every process heard
    within `timeout_s`, and the KV manager's pools known for this scheduler's epoch). A process that
    goes silent or restarts ends every live job with `unavailable`; only a worker that restarts within
    the timeout is recovered instead (its jobs recompute the KV it lost).
    """

    def __init__(
        self,
        core: SchedulerCore,
        num_stages: int,
        recv_inbox: Any,
        send_to_kvcache: Any,
        send_to_ingress: Any,
        send_to_control: Any | None = None,
        clock: Callable[[], float] = time.monotonic,
        epoch: int | None = None,
        heartbeat_s: float = 0.0,
        timeout_s: float = 3.0,
        beacon_to: tuple[str, ...] = (),
        control_token: str = "",
        iteration_log: str = "",
    ) -> None:
        self.core = core
        self.num_stages = num_stages
        self.recv_inbox = recv_inbox
        self.send_to_kvcache = send_to_kvcache
        self.send_to_ingress = send_to_ingress
        self.send_to_control = send_to_control
        self.clock = clock
        self.epoch = epoch or new_epoch()
        core.next_batch_id = max(core.next_batch_id, self.epoch)
        self.heartbeat_s = heartbeat_s  # 0: no heartbeats (in-process tests drive the handlers)
        self.control_token = control_token
        stack = {KVCACHE} | {("worker", k) for k in range(num_stages)}
        self.peers = Peers(timeout_s, stack)
        self.ingress = Peers(timeout_s, {INGRESS})
        self.kv_epoch = 0  # the KV manager whose pools the core bounds starts by (0: none yet)
        self.stack_ready = False
        self.down_reason = ""  # why the stack is down, for the jobs that arrive meanwhile
        self.changes = 0  # times the stack went up or down, in the heartbeat so late ones can be told apart
        self.beacon = Beacon("scheduler", -1, self.epoch, list(beacon_to), heartbeat_s,
                             lambda: (self.stack_ready, self.changes))
        self.log = get_logger()
        self.iterations = IterationLog(iteration_log, {"policy": core.policy.name, "stages": num_stages,
                                                       "overlap": core.overlap, "epoch": self.epoch}) \
            if iteration_log else None
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
            Alive: self.on_alive,
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
            heartbeat_s=config.liveness.heartbeat_s,
            timeout_s=config.liveness.timeout_s,
            beacon_to=(ep.ingress, ep.kvcache),
            control_token=ep.control_token,
            iteration_log=config.scheduler.iteration_log,
        )

    async def run(self) -> None:
        if self.send_to_control is not None:
            await sockets.send(self.send_to_control, Ready("scheduler", -1, self.epoch))
        self.log.info("scheduler_ready", policy=self.core.policy.name, stages=self.num_stages, epoch=self.epoch)
        self.beacon.start()
        watch = asyncio.create_task(self._watch()) if self.heartbeat_s > 0 else None
        try:
            while True:
                msg = await sockets.recv_valid(self.recv_inbox, INBOX_TYPES, self.log)
                await self.handlers[type(msg)](msg)
                await self.pump()
                if watch is not None and watch.done():
                    watch.result()  # the watch loop failed: end run() with its error
        finally:
            if watch is not None:
                watch.cancel()
            self.beacon.stop()

    async def _watch(self) -> None:
        """Every heartbeat: a peer unheard for the timeout is down."""
        while True:
            await asyncio.sleep(self.heartbeat_s)
            now = self.clock()
            for key in self.ingress.expire(now):
                await self.drop_ingress(f"ingress sent no heartbeat for {self.ingress.timeout_s:g} s")
            gone = self.peers.expire(now)
            if gone:
                names = ", ".join(name(k) for k in gone)
                await self.stack_down(f"{names} stopped answering (no heartbeat for {self.peers.timeout_s:g} s)")

    async def pump(self) -> None:
        """Fill the pipeline: up to one batch in flight per stage (nothing while the stack is down)."""
        if not self.stack_ready:
            return
        while True:
            step = self.core.schedule(self.clock())
            if step is None:
                return
            batch = to_wire(step)
            await sockets.send(self.send_to_kvcache, batch)
            if self.iterations is not None:
                self.iterations.sent(step.batch_id, step.job_ids, step.num_new_tokens, step.context_lens, step.carry_from,
                                     self.clock())
            self.log.debug("batch_sent", batch_id=batch.batch_id, jobs=len(batch.job_ids), t=time.time())

    async def emit(self, events: list[JobEvent]) -> None:
        if not events:
            return
        for event in events:
            if event.finish_reason:
                self.log.debug("job_ended", job_id=event.job_id, reason=event.finish_reason)
        await sockets.send(self.send_to_ingress, events[0] if len(events) == 1 else JobEvents.pack(events))

    async def on_submit(self, msg: SubmitJob) -> None:
        if not self.stack_ready:  # sent before ingress heard the stack was down: it ends at once
            await self.emit([JobEvent(msg.job_id, [], "error", "unavailable", self.down_reason or "the stack is not up")])
            return
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
        if self.iterations is not None:
            self.iterations.done(msg.batch_id, msg.job_ids, msg.compute_s, msg.error, self.clock())
        events = self.core.update(from_wire(msg), self.clock())
        await self.pump()  # the next batch goes out before the tokens: the pipeline never waits on clients
        await self.emit(events)

    async def on_kv_changed(self, msg: KVChanged) -> None:
        self.core.kv_changed(msg.copies_in_flight, msg.dropped_job_ids)

    async def on_kv_capacity(self, msg: KVCapacity) -> None:
        """The KV manager's pools, sent once it has (re)set its books for this scheduler's epoch; one for
        another scheduler (an earlier incarnation of this one) is stale."""
        if msg.scheduler_epoch != self.epoch or msg.epoch < self.peers.epoch(KVCACHE):
            self.log.info("stale_kv_capacity", scheduler_epoch=msg.scheduler_epoch, kv_epoch=msg.epoch)
            return
        self.log.info("kv_capacity", device_blocks=msg.device_blocks, host_blocks=msg.host_blocks,
                      block_size=msg.block_size, kv_epoch=msg.epoch)
        self.core.set_capacity(msg)
        self.kv_epoch = msg.epoch
        self.peers.heard(Alive("kvcache", -1, msg.epoch), self.clock())
        await self.check_up()

    async def on_stats_request(self, msg: StatsRequest) -> None:
        await sockets.send(self.send_to_kvcache, msg)  # the KV manager answers with its counters

    async def on_kv_stats(self, msg: Stats) -> None:
        liveness = {"stack_up": int(self.stack_ready), "processes_down": len(self.peers.missing()),
                    **{f"heard_{k}_s_ago": v for k, v in self.peers.ages(self.clock()).items()}}
        await sockets.send(self.send_to_ingress, Stats(msg.request_no, {**msg.values, **self.core.stats(), **liveness}))

    async def on_ready(self, msg: Ready) -> None:
        """A process started (its first word; its heartbeats follow)."""
        if msg.role in ("kvcache", "worker") and msg.epoch > 0:
            await self.on_alive(Alive(msg.role, msg.stage, msg.epoch))

    async def on_alive(self, msg: Alive) -> None:
        key = (msg.role, msg.stage)
        if key == INGRESS:
            if self.ingress.heard(msg, self.clock()) == "restarted":
                await self.drop_ingress("ingress restarted")
            return
        if key not in self.peers.expected:
            self.log.warning("unknown_peer", role=msg.role, stage=msg.stage)
            return
        heard = self.peers.heard(msg, self.clock())
        if heard == "stale":
            return
        if heard == "restarted" and msg.role == "kvcache":
            # Its books are gone: every job's KV is unknown to it. They end; the new manager resets its
            # books for this epoch and sends its pools (KVCapacity) before the stack is up again.
            self.kv_epoch = 0
            await self.stack_down("the KV-cache manager restarted")
        elif heard == "restarted" and self.stack_ready:
            # A stage restarted within the timeout with an empty device pool: batches in flight are lost,
            # the jobs recompute. The KV manager learns it through the same ordered socket as the batches,
            # after every batch sent before.
            self.log.warning("worker_restarted", stage=msg.stage, batches_lost=len(self.core.in_flight))
            self.core.restart_pipeline()
            await sockets.send(self.send_to_kvcache, Ready(msg.role, msg.stage, msg.epoch))
        elif heard == "restarted":  # it restarted while the stack was down: its device pool is new
            await sockets.send(self.send_to_kvcache, Ready(msg.role, msg.stage, msg.epoch))
        if heard != "same":
            self.log.info("peer_heard", peer=name(key), epoch=msg.epoch, how=heard)
        await self.check_up()

    async def check_up(self) -> None:
        """The stack is up when every process is heard and the KV manager's pools are known for it."""
        up = self.peers.all_alive() and self.kv_epoch == self.peers.epoch(KVCACHE) and self.kv_epoch > 0
        if up and not self.stack_ready:
            self.stack_ready = True
            self.changes += 1
            self.down_reason = ""
            self.log.info("stack_ready")
            await sockets.send(self.send_to_ingress, Alive("scheduler", -1, self.epoch, True, self.changes))
            await sockets.send(self.send_to_ingress, Ready("stack", -1, self.epoch))
            await self.pump()

    async def stack_down(self, why: str) -> None:
        """A process is gone or restarted: every live job ends with `unavailable`, nothing runs until all
        are back (ingress hears it from the heartbeat and refuses new requests meanwhile)."""
        self.log.error("stack_down", reason=why, jobs_failed=len(self.core.entries))
        if self.stack_ready:
            self.changes += 1
        self.stack_ready = False
        self.down_reason = why
        await self.emit(self.core.fail_all("unavailable", why, self.clock()))
        if self.kv_epoch == 0:  # the KV manager's books are gone with it: nothing of theirs to free
            self.core.to_free.clear()
        await sockets.send(self.send_to_ingress, Alive("scheduler", -1, self.epoch, False, self.changes))

    async def drop_ingress(self, why: str) -> None:
        """Ingress went away or restarted: nobody can read its jobs' output any more, so they end (and
        their KV is freed) instead of running on as phantoms."""
        if self.core.entries:
            self.log.warning("ingress_lost", reason=why, jobs_dropped=len(self.core.entries))
            now = self.clock()
            for job_id in list(self.core.entries):
                self.core.cancel(job_id, now)  # their batches in flight still return and free their KV

    async def on_exit(self, msg: Exit) -> None:
        """The launcher says a peer died: every live job ends with `internal`; nothing hangs. An Exit
        without the launcher's token (forged, or sent to a process run alone) is dropped."""
        if not self.control_token or msg.token != self.control_token:
            self.log.warning("exit_dropped", role=msg.role, stage=msg.stage, reason="not from this stack's launcher")
            return
        self.log.error("peer_exited", role=msg.role, stage=msg.stage, code=msg.code)
        await self.emit(self.core.fail_all("internal", f"{msg.role} {msg.stage} exited with {msg.code}", self.clock()))

    def close(self) -> None:
        if self.iterations is not None:
            self.iterations.close()
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
