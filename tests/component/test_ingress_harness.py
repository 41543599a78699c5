"""A real Ingress on real ZeroMQ sockets, with the scheduler played by the test (helpers, no tests here)."""

from __future__ import annotations

import asyncio
import math

import zmq
import zmq.asyncio

from common import codec, sockets
from common.messages import CancelJob, JobEvent, Ready, Stats, StatsRequest, SubmitJob
from common.protocol import SERVER_EVENTS
from services.ingress.core import IngressCore
from services.ingress.service import Ingress
from services.ingress.validate import Limits

WAIT_S = 5.0  # bound on every wait in these tests
EOS = 257


class ByteTokenizer:
    """utf-8 bytes are ids 0..255; 256..258 are special and decode to nothing."""

    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


LIMITS = Limits(vocab_size=259, max_context=64, block_size=4, num_gpu_blocks=12, max_jobs_in_system=4, num_host_blocks=48)


async def bounded(awaitable, timeout: float = WAIT_S):
    return await asyncio.wait_for(awaitable, timeout)


class Harness:
    """Ingress under test; `sched_in` receives what it sends the scheduler, `sched_out` feeds it events."""

    TOKEN = "launcher-token"  # the control token the harness's launcher would hold

    def __init__(self, limits: Limits = LIMITS, stats_timeout_s: float = 2.0, client_lease_s: float = 10.0,
                 liveness_timeout_s: float = 3.0) -> None:
        self.ctx = zmq.asyncio.Context()
        self.core = IngressCore(limits, ByteTokenizer(), liveness_timeout_s=liveness_timeout_s, control_token=self.TOKEN)
        router = sockets.bind_router(self.ctx, "tcp://127.0.0.1:*")
        inbox = sockets.bind_inbox(self.ctx, "tcp://127.0.0.1:*")
        self.sched_in = sockets.bind_inbox(self.ctx, "tcp://127.0.0.1:*")
        self.sched_out = sockets.connect_push(self.ctx, sockets.bound_address(inbox))
        to_sched = sockets.connect_push(self.ctx, sockets.bound_address(self.sched_in))
        self.ingress = Ingress(self.core, router, inbox, to_sched, stats_timeout_s=stats_timeout_s,
                               client_lease_s=client_lease_s)
        self.address = sockets.bound_address(router)
        self.clients: list = []
        self.task: asyncio.Task | None = None
        self.auto: asyncio.Task | None = None

    async def start(self, ready: bool = True) -> "Harness":
        self.task = asyncio.create_task(self.ingress.run())
        if ready:
            await self.emit(Ready("stack", -1))
            await bounded(self._until(lambda: self.core.ready))
        return self

    async def _until(self, cond) -> None:
        while not cond():
            await asyncio.sleep(0.002)  # test-only poll of the ingress state, bounded by the caller

    async def close(self) -> None:
        for task in (self.auto, self.task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        for sock in self.clients:
            sock.close(linger=0)
        self.ingress.close()
        self.sched_in.close(linger=0)
        self.sched_out.close(linger=0)
        self.ctx.term()

    # --- the client side ---------------------------------------------------------------------
    def dealer(self) -> zmq.asyncio.Socket:
        sock = sockets.connect_dealer(self.ctx, self.address)
        self.clients.append(sock)
        return sock

    async def event(self, dealer) -> object:
        msg = await bounded(sockets.recv(dealer, SERVER_EVENTS))
        assert not isinstance(msg, codec.DecodeError), msg
        return msg

    # --- the scheduler side ------------------------------------------------------------------
    async def submitted(self, expected=(SubmitJob, CancelJob, StatsRequest)) -> object:
        msg = await bounded(sockets.recv(self.sched_in, expected))
        assert not isinstance(msg, codec.DecodeError), msg
        return msg

    async def emit(self, msg) -> None:
        await sockets.send(self.sched_out, msg)

    def serve_automatically(self, token_delay_s: float = 0.002, kv_total: int | None = None) -> None:
        """Play a scheduler: echo the prompt cyclically as output, honour cancels, answer stats."""
        self.auto = asyncio.create_task(self._auto(token_delay_s, kv_total or self.core.limits.num_gpu_blocks))

    async def _auto(self, delay: float, kv_total: int) -> None:
        cancelled: set[int] = set()
        used: dict[int, int] = {}
        block = self.core.limits.block_size
        runs = []
        while True:
            msg = await sockets.recv(self.sched_in)
            if isinstance(msg, SubmitJob):
                used[msg.job_id] = math.ceil((len(msg.prompt_ids) + msg.max_tokens) / block)
                runs.append(asyncio.create_task(self._run_job(msg, delay, cancelled, used)))
            elif isinstance(msg, CancelJob):
                cancelled.add(msg.job_id)
            elif isinstance(msg, StatsRequest):
                free = kv_total - sum(used.values())
                await self.emit(Stats(msg.request_no, {"kv_free_blocks": free, "kv_total_blocks": kv_total}))

    async def _run_job(self, job: SubmitJob, delay: float, cancelled: set[int], used: dict[int, int]) -> None:
        for i in range(job.max_tokens):
            await asyncio.sleep(delay)  # one fake iteration
            if job.job_id in cancelled:
                used.pop(job.job_id)
                await self.emit(JobEvent(job.job_id, [], "cancelled", "", ""))
                return
            token = job.prompt_ids[i % len(job.prompt_ids)]
            last = i == job.max_tokens - 1 or token in job.stop_token_ids
            if last:
                used.pop(job.job_id)
            reason = ("stop" if token in job.stop_token_ids else "length") if last else ""
            await self.emit(JobEvent(job.job_id, [token], reason, "", ""))
            if last:
                return
