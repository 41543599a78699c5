"""Restarting a stage worker while jobs are swapped out: every job still ends with the right tokens."""

from __future__ import annotations

import asyncio

import zmq.asyncio

from common import sockets
from common.client import AsyncClient
from common.messages import Exit, Ready
from stack import Processes
from test_serving import bounded, make_requests, reference


async def wait_ready(inbox, expected: set[tuple[str, int]], seconds: float = 180.0) -> None:
    seen: set[tuple[str, int]] = set()
    while not expected <= seen:
        msg = await bounded(sockets.recv(inbox, (Ready, Exit)), seconds)
        if isinstance(msg, Ready):
            seen.add((msg.role, msg.stage))


async def test_worker_restart_with_jobs_swapped_out(tmp_path):
    procs = Processes(tmp_path, ["cache.num_gpu_blocks=16", "cache.headroom_blocks=2", "cache.num_host_blocks=512",
                                 "scheduler.max_jobs=4", "scheduler.policy=skip-join-mlfq",
                                 "scheduler.base_quantum_s=0.002", "cache.swap=proactive"])
    requests = make_requests(40, seed=11)
    requests = [(prompt, max(tokens, 20)) for prompt, tokens in requests]
    want = reference(requests)
    ctx = zmq.asyncio.Context()
    control = sockets.bind_inbox(ctx, procs.control)
    try:
        procs.start_all()
        await wait_ready(control, {("worker", 0), ("worker", 1), ("kvcache", -1), ("scheduler", -1), ("ingress", -1)})
        async with AsyncClient(procs.endpoint, timeout=300) as client:
            await bounded(client.wait_ready(timeout=60))
            tasks = [asyncio.create_task(client.generate(prompt_ids=p, max_tokens=m)) for p, m in requests]
            for _ in range(2000):  # wait until some KV lives only in the host pool
                stats = await bounded(client.stats())
                if stats["swaps_out"] > stats["swaps_in"] and stats["host_blocks_free"] < stats["host_blocks_total"]:
                    break
                await asyncio.sleep(0.005)
            assert stats["host_blocks_free"] < stats["host_blocks_total"], stats
            procs.kill("worker", 1)
            procs.start("worker", 1)
            results = await bounded(asyncio.gather(*tasks), 300)
            stats = await bounded(client.stats())
        for (prompt, max_tokens), result, tokens in zip(requests, results, want):
            assert result.token_ids == tokens, f"prompt {prompt} max_tokens {max_tokens}"
        assert stats["swaps_in"] > 0 and stats["recomputes"] > 0, stats
    finally:
        codes = procs.stop()
        control.close(linger=0)
        ctx.term()
    assert all(code == 0 for code in codes.values()), codes
