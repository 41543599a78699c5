"""Processes run alone (as docker-compose runs them): whichever one dies, every live request ends with an
error within the liveness bound, new requests get `unavailable` while it is down, and after a restart the
stack serves again with every KV block back in the pool."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from common.client import AsyncClient, FastServeError
from bench.liveness import ended
from stack import ROOT, Processes
from test_serving import bounded, make_requests, reference

TIMEOUT_S = 2.0  # liveness.timeout_s of these stacks
BOUND_S = TIMEOUT_S + 2.5  # the promise checked: death to the client's error (detection + relay + slack)
OVERRIDES = [f"liveness.timeout_s={TIMEOUT_S}", "liveness.heartbeat_s=0.25", "cache.num_gpu_blocks=160",
             "cache.headroom_blocks=2", "cache.num_host_blocks=512", "cache.swap=proactive",
             "scheduler.policy=skip-join-mlfq", "scheduler.base_quantum_s=0.002", "scheduler.max_jobs=4",
             "scheduler.profile=", "ingress.client_lease_s=0"]


async def kill_while_serving(procs: Processes, client: AsyncClient, role: str, stage: int = -1) -> list[tuple[str, float]]:
    """Start long requests, kill the process once tokens flow, and return how each request ended."""
    killed_at = [0.0]
    tasks = [asyncio.create_task(client.generate(prompt_ids=[5 + i, 7, 9], max_tokens=600, ignore_eos=True))
             for i in range(6)]
    ends = [asyncio.create_task(ended(t, killed_at)) for t in tasks]
    for _ in range(400):
        if (await bounded(client.stats()))["tokens_generated"] > 50:
            break
        await asyncio.sleep(0.02)
    assert not any(t.done() for t in tasks), "the requests ended before the kill; make them longer"
    killed_at[0] = time.monotonic()
    procs.kill(role, stage)
    return await bounded(asyncio.gather(*ends), 60)


async def refused_while_down(client: AsyncClient) -> FastServeError:
    """A new request while a process is down (retried until ingress has heard: within the bound)."""
    deadline = time.monotonic() + BOUND_S
    while True:
        try:
            await client.generate(prompt_ids=[1, 2], max_tokens=2)
        except FastServeError as e:
            if e.code == "unavailable" or time.monotonic() > deadline:
                return e
        await asyncio.sleep(0.1)


async def serves_again(client: AsyncClient) -> dict:
    """After the restart: the stack becomes ready, its tokens equal the reference, the KV pool is whole."""
    await bounded(client.wait_ready(timeout=120), 130)
    requests = make_requests(12, seed=5)
    want = reference(requests)
    results = await bounded(asyncio.gather(*(client.generate(prompt_ids=p, max_tokens=m) for p, m in requests)), 120)
    assert [r.token_ids for r in results] == want
    stats = await bounded(client.stats())
    for _ in range(100):  # the last frees ride on the next housekeeping step
        if stats["kv_whole"] and stats["kv_free_blocks"] == stats["kv_total_blocks"]:
            break
        await asyncio.sleep(0.05)
        stats = await bounded(client.stats())
    assert stats["kv_whole"] == 1 and stats["kv_free_blocks"] == stats["kv_total_blocks"], stats
    assert stats["host_blocks_free"] == stats["host_blocks_total"], stats
    assert stats["stack_up"] == 1 and stats["processes_down"] == 0 and stats["jobs_live"] == 0, stats
    return stats


def healthy(procs: Processes) -> bool:
    out = subprocess.run([sys.executable, "deploy/healthcheck.py", "--config", str(procs.config_path), "ingress",
                          "--timeout", "3"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    return out.returncode == 0


@pytest.mark.parametrize("role, stage", [("scheduler", -1), ("kvcache", -1), ("worker", 1)])
async def test_a_process_killed_while_serving_ends_every_request_in_bound_and_rejoins(tmp_path, role, stage):
    procs = Processes(tmp_path, OVERRIDES)
    try:
        procs.start_all()
        async with AsyncClient(procs.endpoint, timeout=120) as client:
            await bounded(client.wait_ready(timeout=120), 130)
            ends = await kill_while_serving(procs, client, role, stage)
            assert all(code == "unavailable" for code, _ in ends), ends
            assert max(seconds for _, seconds in ends) < BOUND_S, ends
            assert (await refused_while_down(client)).code == "unavailable"
            assert not healthy(procs)  # the health check reports the stack, not one process
            procs.start(role, stage)
            await serves_again(client)
            assert healthy(procs)
    finally:
        codes = procs.stop()
    assert all(code == 0 for code in codes.values()), codes


async def test_a_stalled_ingress_heartbeat_drops_its_jobs_at_the_scheduler(tmp_path):
    """Ingress killed with jobs running: the scheduler ends them (no phantom jobs, no leaked blocks), and a
    restarted ingress serves with a whole pool."""
    procs = Processes(tmp_path, OVERRIDES)
    try:
        procs.start_all()
        async with AsyncClient(procs.endpoint, timeout=120) as client:
            await bounded(client.wait_ready(timeout=120), 130)
            tasks = [asyncio.create_task(client.generate(prompt_ids=[3, 4, i], max_tokens=600, ignore_eos=True))
                     for i in range(4)]
            for _ in range(400):
                if (await bounded(client.stats()))["tokens_generated"] > 50:
                    break
                await asyncio.sleep(0.02)
            procs.kill("ingress")
            await asyncio.sleep(TIMEOUT_S + 1.0)
            procs.start("ingress")
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        async with AsyncClient(procs.endpoint, timeout=120) as client:
            stats = await serves_again(client)
            assert stats["jobs_cancelled"] + stats["jobs_failed"] >= 4, stats
    finally:
        codes = procs.stop()
    assert all(code == 0 for code in codes.values()), codes


async def test_forged_internal_messages_are_dropped_and_the_stack_keeps_serving(tmp_path):
    """Anyone who reaches the internal ports (no CURVE): an Exit without the launcher's token, heartbeats of
    unknown or earlier processes, pools for another scheduler, a copy nobody asked for and a job under an id
    ingress never gave (ids start at its epoch) change nothing for the live request, which gets its full
    output."""
    import zmq.asyncio

    from common import sockets
    from common.messages import Alive, Exit, KVCapacity, SubmitJob, SwapDone

    procs = Processes(tmp_path, OVERRIDES)
    ctx = zmq.asyncio.Context()
    try:
        procs.start_all()
        ep = procs.config.endpoints
        inboxes = [sockets.connect_push(ctx, a) for a in (ep.scheduler, ep.ingress, ep.kvcache)]
        async with AsyncClient(procs.endpoint, timeout=120) as client:
            await bounded(client.wait_ready(timeout=120), 130)
            live = asyncio.create_task(client.generate(prompt_ids=[3, 1, 4], max_tokens=300, ignore_eos=True))
            while (await bounded(client.stats()))["jobs_live"] == 0:
                await asyncio.sleep(0.02)
            forged = [Exit("worker", 1, -9), Exit("scheduler", -1, -9, "guess"), Alive("intruder", 7, 1),
                      Alive("scheduler", -1, 1, False), Alive("kvcache", -1, 1), Alive("worker", 0, 1),
                      KVCapacity(1, 0, 16, 0, 1, 12345), SwapDone(0, [1, 2, 3], 0.1, 0.0),
                      SubmitJob(1, [1], 1, 0.0, 0, 1.0, None, [], False)]
            for sock in inboxes:
                for msg in forged:
                    await sockets.send(sock, msg)
            result = await bounded(live, 120)
            assert len(result.token_ids) == 300
            again = await bounded(client.generate(prompt_ids=[2, 7], max_tokens=4))
            assert len(again.token_ids) == 4
            stats = await bounded(client.stats())
            assert stats["stack_up"] == 1 and stats["jobs_failed"] == 0, stats
    finally:
        for sock in inboxes:
            sock.close(linger=0)
        ctx.term()
        codes = procs.stop()
    assert all(code == 0 for code in codes.values()), codes
