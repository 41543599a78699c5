"""Client leases over real sockets: a client that stops talking has its requests cancelled; heartbeats keep them."""

from __future__ import annotations

import asyncio
import time

import msgpack
import zmq

from common import sockets
from common.client import AsyncClient
from common.messages import CancelJob, JobEvent, SubmitJob
from common.protocol import PROTOCOL_VERSION, SERVER_EVENTS, ErrorEvent
from services.ingress.validate import Limits
from test_ingress_harness import Harness, bounded

LEASE_S = 0.3
ROOMY = Limits(vocab_size=259, max_context=2048, block_size=4, num_gpu_blocks=1000, max_jobs_in_system=4)


async def test_a_client_that_stops_talking_has_its_long_request_cancelled_after_its_lease():
    h = await Harness(ROOMY, client_lease_s=LEASE_S).start()
    try:
        d = h.dealer()
        request = {"version": PROTOCOL_VERSION, "request_id": "long", "prompt": "go", "max_tokens": 2000,
                   "stream": False}
        await d.send_multipart([b"\x01", msgpack.packb(request)])
        sent = time.monotonic()
        job = await h.submitted()
        assert isinstance(job, SubmitJob) and job.max_tokens == 2000
        await h.emit(JobEvent(job.job_id, [65], "", "", ""))  # the job runs; a non-streaming client hears nothing
        cancel = await h.submitted()
        waited = time.monotonic() - sent
        assert cancel == CancelJob(job.job_id)
        assert LEASE_S <= waited < LEASE_S + 1.0, waited
        await h.emit(JobEvent(job.job_id, [], "cancelled", "", ""))
        event = await bounded(sockets.recv(d, SERVER_EVENTS))  # if it reads again, it learns why
        assert isinstance(event, ErrorEvent) and (event.request_id, event.code) == ("long", "cancelled")
        assert "lease" in event.message
        await bounded(h._until(lambda: not h.core.jobs))
    finally:
        await h.close()


async def test_the_client_librarys_heartbeats_keep_a_quiet_request_alive():
    h = await Harness(ROOMY, client_lease_s=LEASE_S).start()
    client = AsyncClient(h.address, timeout=10, ctx=h.ctx, heartbeat_s=LEASE_S / 4)
    try:
        result = asyncio.create_task(client.generate("go", max_tokens=100))
        job = await h.submitted()
        assert isinstance(job, SubmitJob)
        await asyncio.sleep(4 * LEASE_S)  # a job that is slow to produce anything, longer than the lease
        assert await _nothing_sent(h)
        await h.emit(JobEvent(job.job_id, [104, 105], "length", "", ""))
        assert (await bounded(result)).text == "hi"
    finally:
        await client.close()
        await h.close()


async def _nothing_sent(h: Harness) -> bool:
    return not await h.sched_in.poll(timeout=50, flags=zmq.POLLIN)
