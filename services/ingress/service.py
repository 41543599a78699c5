"""The ingress process shell: moves messages between client sockets, the scheduler and IngressCore."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from common import sockets
from common.liveness import Beacon, new_epoch
from common.log import get_logger
from common.messages import Alive, Exit, JobEvent, JobEvents, Ready, Stats
from common.protocol import CLIENT_LEASE_S, CLIENT_MESSAGES, TokenEvent, TokenEvents
from services.ingress.core import IngressCore, ToClient, ToScheduler
from services.ingress.leases import Leases
from services.ingress.outbox import ClientOutbox
from services.ingress.validate import Limits

STATS_TIMEOUT_S = 5.0  # a stats query the scheduler has not answered by then gets `unavailable`
CLIENT_STALL_S = 30.0  # a client that reads none of its events for this long has its requests cancelled
FLUSH_S = 0.005  # how often queued client events are retried while any wait
EVENT_TYPES = (JobEvent, JobEvents, Stats, Ready, Exit, Alive)


class Ingress:
    """Client ROUTER in, scheduler PUSH out, inbox PULL for scheduler events; all logic is in `core`."""

    def __init__(
        self,
        core: IngressCore,
        from_clients: Any,
        recv_from_scheduler: Any,
        send_to_scheduler: Any,
        send_to_control: Any | None = None,
        stats_timeout_s: float = STATS_TIMEOUT_S,
        client_stall_s: float = CLIENT_STALL_S,
        client_lease_s: float = CLIENT_LEASE_S,
        beacon: Beacon | None = None,
    ) -> None:
        self.core = core
        self.beacon = beacon  # heartbeats to the scheduler
        self.from_clients = from_clients
        self.leases = Leases(client_lease_s) if client_lease_s > 0 else None  # 0 = clients are never timed out
        self.lost: list[tuple[bytes, str]] = []  # clients gone or not reading, for the flush loop to cancel
        self.outbox = ClientOutbox(from_clients, client_stall_s, lambda identity, why: self.lost.append((identity, why)))
        self.recv_from_scheduler = recv_from_scheduler
        self.send_to_scheduler = send_to_scheduler
        self.send_to_control = send_to_control
        self.stats_timeout_s = stats_timeout_s
        self.log = get_logger()

    @classmethod
    def from_config(cls, config: Any, ctx: Any | None = None) -> "Ingress":
        """Load the model's spec and tokenizer, bind the client ROUTER and the inbox, connect to the scheduler."""
        from common.model.spec import load_spec
        from common.model.tokenizer import load_tokenizer

        spec = load_spec(config.model.path)
        limits = Limits.from_config(config, spec)
        ep = config.endpoints
        epoch = new_epoch()
        core = IngressCore(limits, load_tokenizer(config.model.path), first_job_id=epoch,
                           liveness_timeout_s=config.liveness.timeout_s, control_token=ep.control_token)
        ctx = ctx or sockets.context()
        return cls(
            core,
            from_clients=sockets.bind_router(ctx, ep.client, ep.bind_any, limits.max_message_bytes),
            recv_from_scheduler=sockets.bind_inbox(ctx, ep.ingress, ep.bind_any),
            send_to_scheduler=sockets.connect_push(ctx, ep.scheduler),
            send_to_control=sockets.connect_push(ctx, ep.control) if ep.control else None,
            client_lease_s=config.ingress.client_lease_s,
            beacon=Beacon("ingress", -1, epoch, [ep.scheduler], config.liveness.heartbeat_s),
        )

    async def run(self) -> None:
        """Announce readiness, then serve until cancelled; an I/O task's failure ends run() with it."""
        if self.send_to_control is not None:
            await sockets.send(self.send_to_control, Ready("ingress", -1))
        self.log.info("ingress_ready", client=sockets.bound_address(self.from_clients))
        tasks = [asyncio.create_task(self._client_loop()), asyncio.create_task(self._scheduler_loop()),
                 asyncio.create_task(self._flush_loop())]
        if self.beacon is not None:
            self.beacon.start()
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.beacon is not None:
                self.beacon.stop()

    async def _client_loop(self) -> None:
        while True:
            identity, msg, frames = await sockets.recv_routed(self.from_clients, CLIENT_MESSAGES)
            if self.leases is not None:
                self.leases.heard(identity, time.monotonic())
            if isinstance(msg, Exception):
                self.log.info("bad_client_message", code=msg.code, error=msg.message)
            await self._send(self.core.on_client(identity, msg, frames))

    async def _scheduler_loop(self) -> None:
        while True:
            msg = await sockets.recv_valid(self.recv_from_scheduler, EVENT_TYPES, self.log, "bad_scheduler_message")
            if isinstance(msg, Alive):
                was_ready = self.core.ready
                await self._send(self.core.on_alive(msg, time.monotonic()))
                if was_ready != self.core.ready:
                    self.log.warning("stack_up" if self.core.ready else "stack_down", scheduler_epoch=msg.epoch)
                continue
            if isinstance(msg, Ready):
                self.log.info("peer_ready", peer=msg.role, stage=msg.stage)
            elif isinstance(msg, Exit):
                if not self.core.from_launcher(msg):
                    self.log.warning("exit_dropped", peer=msg.role, stage=msg.stage, reason="not from this stack's launcher")
                    continue
                self.log.error("peer_exited", peer=msg.role, stage=msg.stage, exit_code=msg.code)
            await self._send(self.core.on_event(msg))
            await self._tell_control(msg)

    async def _flush_loop(self) -> None:
        """Deliver queued client events; cancel the requests of clients that went away, stopped reading,
        or let their lease expire."""
        while True:
            await asyncio.sleep(FLUSH_S if self.outbox.backlog else 10 * FLUSH_S)
            self.outbox.flush()
            expired = self.core.expire(time.monotonic())
            if expired:
                self.log.error("stack_down", reason="the scheduler stopped answering")
                await self._send(expired)
            if self.leases is not None:
                why = f"the client sent nothing for {self.leases.lease_s:g} s (its lease expired)"
                self.lost += [(identity, why) for identity in self.leases.expired(time.monotonic())
                              if self.core.has_live(identity)]
            while self.lost:
                identity, why = self.lost.pop(0)
                self.log.warning("client_lost", client=identity.hex(), reason=why)
                await self._send(self.core.drop_client(identity, why))

    async def _tell_control(self, msg: Any) -> None:
        """The launcher waits for the stack's readiness as ingress sees it, and for ingress to have
        failed every live request after a peer died, before it stops the stack."""
        if self.send_to_control is None:
            return
        if isinstance(msg, Ready) and msg.role == "stack":
            await sockets.send(self.send_to_control, msg)
        elif isinstance(msg, Exit):
            await sockets.send(self.send_to_control, Exit("ingress", -1, 0))

    async def _send(self, outs: list[Any]) -> None:
        batches: dict[bytes, list[TokenEvent]] = {}  # per client, TokenEvents that travel together
        for out in outs:
            if isinstance(out, ToClient):
                if out.batch:
                    batches.setdefault(out.identity, []).append(out.msg)
                    continue
                if out.identity in batches:  # what came before goes first: a request's events stay in order
                    self._to_client(out.identity, batches.pop(out.identity))
                self.outbox.send(out.identity, out.msg)
            elif isinstance(out, ToScheduler):
                await sockets.send(self.send_to_scheduler, out.msg)
                request_no = getattr(out.msg, "request_no", None)
                if request_no is not None:
                    asyncio.get_running_loop().call_later(self.stats_timeout_s, self._expire_stats, request_no)
        for identity, events in batches.items():
            self._to_client(identity, events)

    def _to_client(self, identity: bytes, events: list[TokenEvent]) -> None:
        self.outbox.send(identity, events[0] if len(events) == 1 else TokenEvents(events))

    def _expire_stats(self, request_no: int) -> None:
        outs = self.core.stats_timeout(request_no)
        if outs:
            asyncio.ensure_future(self._send(outs))

    def close(self) -> None:
        for sock in (self.from_clients, self.recv_from_scheduler, self.send_to_scheduler, self.send_to_control):
            if sock is not None:
                sock.close(linger=0)
