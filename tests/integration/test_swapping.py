"""A device KV pool that holds only a few jobs: swapping (or recompute) keeps every output exact."""

from __future__ import annotations

import asyncio

import pytest

from common.client import AsyncClient
from stack import Stack
from test_serving import bounded, make_requests, reference

SMALL_POOL = ["cache.num_gpu_blocks=24", "cache.headroom_blocks=2", "cache.num_host_blocks=512",
              "scheduler.max_jobs=8", "scheduler.policy=skip-join-mlfq", "scheduler.base_quantum_s=0.002"]


@pytest.fixture(scope="module")
def expected():
    requests = make_requests(100, seed=7)
    return requests, reference(requests)


@pytest.mark.parametrize("mode", ["proactive", "reactive", "recompute"])
async def test_100_requests_under_memory_pressure_equal_offline_generate(mode, expected):
    requests, want = expected
    # recompute has no host pool: the default admission bound (device + host blocks) would refuse most of
    # the burst; this test is about serving it under pressure, so the bound is off there
    bound = ["ingress.kv_overcommit=0"] if mode == "recompute" else []
    stack = Stack([*SMALL_POOL, f"cache.swap={mode}", *bound])
    try:
        async with AsyncClient(stack.endpoint, timeout=300) as client:
            results = await bounded(
                asyncio.gather(*(client.generate(prompt_ids=p, max_tokens=m) for p, m in requests)), 300
            )
            for (prompt, max_tokens), result, tokens in zip(requests, results, want):
                assert result.token_ids == tokens, f"{mode}: prompt {prompt} max_tokens {max_tokens}"
            stats = await bounded(client.stats())
            for _ in range(100):  # the last frees ride on the scheduler's next message
                if stats["kv_whole"] == 1:
                    break
                await asyncio.sleep(0.05)
                stats = await bounded(client.stats())
    finally:
        assert stack.stop() == 0
    assert stats["kv_whole"] == 1, stats
    assert stats["device_blocks_free"] == stats["device_blocks_total"]
    assert stats["host_blocks_free"] == stats["host_blocks_total"]
    if mode == "recompute":
        assert stats["dropped"] > 0 and stats["recomputes"] > 0, stats
    else:
        assert stats["swaps_out"] > 0 and stats["swaps_in"] > 0, stats
        assert stats["copy_s"] > 0, stats
