"""A client that reads slowly, or not at all: no final event is ever dropped, and no one else waits."""

from __future__ import annotations

import asyncio

import zmq
import zmq.asyncio

from common import codec, sockets
from common.messages import CancelJob, JobEvent, JobEvents, Ready, SubmitJob
from common.protocol import SERVER_EVENTS, ErrorEvent, FinishEvent, Generate, TokenEvent, TokenEvents
from services.ingress.core import IngressCore
from services.ingress.service import Ingress
from services.ingress.validate import Limits
from test_ingress_harness import ByteTokenizer, bounded

LIMITS = Limits(vocab_size=259, max_context=64, block_size=4, num_gpu_blocks=1024, max_jobs_in_system=64)
HWM = 4  # messages each side of the client pipe holds: inproc queues sndhwm + rcvhwm, no kernel buffers


class Setup:
    def __init__(self, stall_s: float) -> None:
        self.ctx = zmq.asyncio.Context()
        router = self.ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # as sockets.bind_router sets it
        router.setsockopt(zmq.SNDHWM, HWM)
        router.bind("inproc://slow-clients")
        inbox = sockets.bind_inbox(self.ctx, "inproc://slow-ingress")
        self.sched_in = sockets.bind_inbox(self.ctx, "inproc://slow-scheduler")
        self.sched_out = sockets.connect_push(self.ctx, "inproc://slow-ingress")
        self.core = IngressCore(LIMITS, ByteTokenizer())
        self.ingress = Ingress(self.core, router, inbox, sockets.connect_push(self.ctx, "inproc://slow-scheduler"),
                               client_stall_s=stall_s)
        self.client = self.ctx.socket(zmq.DEALER)
        self.client.setsockopt(zmq.LINGER, 0)
        self.client.setsockopt(zmq.RCVHWM, HWM)
        self.client.connect("inproc://slow-clients")
        self.task = asyncio.create_task(self.ingress.run())

    async def start(self, n: int, batch_events=lambda k: False) -> list[SubmitJob]:
        await sockets.send(self.sched_out, Ready("stack", -1))
        await bounded(self._until(lambda: self.core.ready))
        for k in range(n):
            await self.client.send_multipart(codec.encode(Generate(version=2, request_id=f"r{k}", prompt_ids=[65, 66], max_tokens=30,
                                                                    stream=True, batch_events=batch_events(k))))
        return [await bounded(sockets.recv(self.sched_in, SubmitJob)) for _ in range(n)]

    async def _until(self, cond) -> None:
        while not cond():
            await asyncio.sleep(0.002)  # test-only poll of the ingress state, bounded by the caller

    async def read_all(self, n_final: int) -> dict[str, list]:
        events: dict[str, list] = {}
        finals = 0
        while finals < n_final:
            msg = codec.decode(await bounded(self.client.recv_multipart()), SERVER_EVENTS)
            events.setdefault(msg.request_id, []).append(msg)
            finals += isinstance(msg, (FinishEvent, ErrorEvent))
        return events

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        self.ingress.close()
        for sock in (self.client, self.sched_in, self.sched_out):
            sock.close(linger=0)
        self.ctx.term()


async def test_a_slow_reader_gets_every_event_and_exactly_one_final_per_request():
    s = Setup(stall_s=30.0)
    try:
        jobs = await s.start(20)
        for step in range(10):  # 10 iterations of 20 jobs: 200 token events, then 20 finals, none read yet
            await sockets.send(s.sched_out, JobEvents.pack([JobEvent(j.job_id, [67], "", "", "") for j in jobs]))
        await sockets.send(s.sched_out, JobEvents.pack([JobEvent(j.job_id, [68], "length", "", "") for j in jobs]))
        await bounded(s._until(lambda: s.ingress.outbox.waiting > 0))  # the pipe is full: queued, not dropped
        events = await s.read_all(20)
        for k in range(20):
            got = events[f"r{k}"]
            assert [type(e) for e in got] == [TokenEvent] * 10 + [FinishEvent], k
            assert [t for e in got for t in e.token_ids] == [67] * 10 + [68] and got[-1].finish_reason == "length"
        assert s.ingress.outbox.counters["clients_stalled"] == 0
    finally:
        await s.close()


async def test_a_client_that_stops_reading_has_its_requests_cancelled_but_gets_their_final_events():
    s = Setup(stall_s=0.3)
    try:
        jobs = await s.start(6)
        for _ in range(5):
            await sockets.send(s.sched_out, JobEvents.pack([JobEvent(j.job_id, [67], "", "", "") for j in jobs]))
        # the client reads nothing: after the stall bound every one of its jobs is cancelled at the scheduler
        cancels = {(await bounded(sockets.recv(s.sched_in, CancelJob))).job_id for _ in jobs}
        assert cancels == {j.job_id for j in jobs}
        await sockets.send(s.sched_out, JobEvents.pack([JobEvent(j.job_id, [], "cancelled", "", "") for j in jobs]))
        events = await s.read_all(6)
        for k in range(6):
            finals = [e for e in events[f"r{k}"] if isinstance(e, (FinishEvent, ErrorEvent))]
            assert len(finals) == 1 and finals[0].code == "cancelled" and "read nothing" in finals[0].message
        assert s.ingress.outbox.counters["clients_stalled"] == 1
        await bounded(s._until(lambda: not s.core.jobs))  # the scheduler's finals released the admission slots
    finally:
        await s.close()


async def test_a_client_that_went_away_has_its_requests_cancelled_at_its_next_event():
    s = Setup(stall_s=30.0)
    try:
        jobs = await s.start(3)
        s.client.close(linger=0)  # gone without cancelling
        await asyncio.sleep(0.1)  # let the server side see the disconnect (inproc peers detach at once)
        await sockets.send(s.sched_out, JobEvents.pack([JobEvent(j.job_id, [67], "", "", "") for j in jobs]))
        cancels = {(await bounded(sockets.recv(s.sched_in, CancelJob))).job_id for _ in jobs}
        assert cancels == {j.job_id for j in jobs}
        assert s.ingress.outbox.counters["client_events_to_gone"] >= 1
    finally:
        s.client = s.ctx.socket(zmq.DEALER)  # close() closes a socket; this one was already closed
        await s.close()


async def test_requests_that_ask_for_batches_get_one_message_per_iteration_and_the_others_one_per_event():
    s = Setup(stall_s=30.0)
    try:
        jobs = await s.start(6, batch_events=lambda k: k < 4)  # r0..r3 batched, r4 and r5 one by one
        got: list = []
        for step in range(3):
            await sockets.send(s.sched_out, JobEvents.pack([JobEvent(j.job_id, [67 + step], "", "", "") for j in jobs]))
            got += [codec.decode(await bounded(s.client.recv_multipart()), SERVER_EVENTS) for _ in range(3)]
        await sockets.send(s.sched_out, JobEvents.pack([JobEvent(j.job_id, [70], "length", "", "") for j in jobs]))
        got += [codec.decode(await bounded(s.client.recv_multipart()), SERVER_EVENTS) for _ in range(6)]
        batches = [m for m in got if isinstance(m, TokenEvents)]
        assert len(batches) == 3 and all([e.request_id for e in b.events] == ["r0", "r1", "r2", "r3"] for b in batches)
        singles = [m.request_id for m in got if isinstance(m, TokenEvent)]
        assert sorted(singles) == ["r4"] * 3 + ["r5"] * 3
        finals = [m for m in got if isinstance(m, FinishEvent)]
        assert sorted(f.request_id for f in finals) == [f"r{k}" for k in range(6)]
        assert all(f.token_ids == [70] and f.completion_tokens == 4 for f in finals)
        assert [t for b in batches for t in b.events[2].token_ids] == [67, 68, 69]  # r2's tokens, in order
    finally:
        await s.close()
