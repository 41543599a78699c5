"""`fastserve ingress` as a real process: ready handshake, the tiny model's tokenizer, a clean stop."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys

import zmq
import zmq.asyncio

from common import codec, sockets
from common.client import AsyncClient
from common.messages import Alive, JobEvent, Ready, Stats, StatsRequest, SubmitJob
from test_ingress_harness import bounded


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def from_ingress(sock):
    """The next message ingress sent the scheduler, past its heartbeats."""
    while isinstance(msg := await bounded(sockets.recv(sock)), Alive):
        assert msg.role == "ingress" and msg.epoch > 0
    return msg


async def test_ingress_process_handshakes_serves_and_stops(tmp_path):
    ports = [free_port() for _ in range(4)]
    client, inbox, sched, control = (f"tcp://127.0.0.1:{p}" for p in ports)
    ctx = zmq.asyncio.Context()
    control_in = sockets.bind_inbox(ctx, control)
    sched_in = sockets.bind_inbox(ctx, sched)
    to_ingress = sockets.connect_push(ctx, inbox)
    overrides = [f"endpoints.client={client}", f"endpoints.ingress={inbox}", f"endpoints.scheduler={sched}",
                 f"endpoints.control={control}", "model.path=tiny", "model.max_context=128"]
    args = [sys.executable, "-m", "services.ingress", *sum((["--set", o] for o in overrides), [])]
    proc = await asyncio.create_subprocess_exec(*args, stderr=asyncio.subprocess.PIPE)
    try:
        assert await bounded(sockets.recv(control_in), 20) == Ready("ingress", -1)
        await sockets.send(to_ingress, Ready("stack", -1))
        async with AsyncClient(client, timeout=5) as c:
            # the Ready above and client requests travel on different sockets: wait until the stack answers
            ready = asyncio.create_task(c.wait_ready(timeout=10))
            query = await from_ingress(sched_in)
            assert isinstance(query, StatsRequest)
            await sockets.send(to_ingress, Stats(query.request_no, {"kv_free_blocks": 1, "kv_total_blocks": 1}))
            assert (await bounded(ready))["kv_total_blocks"] == 1
            request = asyncio.create_task(c.generate("é!", max_tokens=3))
            job = await from_ingress(sched_in)
            assert isinstance(job, SubmitJob) and job.prompt_ids == list("é!".encode())
            await sockets.send(to_ingress, JobEvent(job.job_id, [0xC3, 0xA9, 0x21], "length", "", ""))
            result = await bounded(request)
            assert (result.text, result.prompt_tokens) == ("é!", 3)
        proc.send_signal(signal.SIGINT)
        assert await bounded(proc.wait(), 10) == 0
        log = (await proc.stderr.read()).decode()
        assert "ingress_ready" in log and "role=ingress" in log
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for s in (control_in, sched_in, to_ingress):
            s.close(linger=0)
        ctx.term()
    assert codec.registered()  # the process used the same registry
