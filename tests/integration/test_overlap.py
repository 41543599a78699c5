"""Overlapped scheduling changes when batches are prepared, never what a request produces.

With `scheduler.overlap` a decode job is carried into the next batch before its token reaches the
scheduler (the last stage hands the token to stage 0), and finish checks run one iteration late. One
stack without overlap gives the outputs; a stack with overlap, under every policy, must produce the
same tokens for greedy and seeded requests, under a device pool small enough to swap, with requests
cancelled mid-stream alongside, and leave the KV pools whole.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from common.client import AsyncClient, RequestCancelled
from stack import Stack
from test_serving import bounded

POOL = ["cache.num_gpu_blocks=24", "cache.headroom_blocks=2", "cache.num_host_blocks=512", "scheduler.max_jobs=8",
        "scheduler.base_quantum_s=0.002"]
POLICIES = ["skip-join-mlfq", "mlfq", "fcfs", "orca", "rtc", "srpt-oracle"]


def requests(n: int = 28, seed: int = 11) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        params = {"prompt_ids": [rng.randrange(256) for _ in range(rng.randint(1, 40))],
                  "max_tokens": rng.randint(2, 48), "request_id": f"r{i}"}
        if i % 2:  # seeded sampling: a request's tokens depend only on its seed, never on its batch
            params.update(temperature=0.9, top_p=0.95, seed=1000 + i)
        if i % 5 == 0:
            params["stop_token_ids"] = [rng.randrange(256)]  # some end early on a stop token
        out.append(params)
    return out


async def serve(stack: Stack) -> tuple[dict[str, list[int]], dict]:
    async with AsyncClient(stack.endpoint, timeout=300) as client:

        async def victim(k: int) -> str:
            request_id = f"v{k}"
            try:
                seen = 0
                async for event in client.stream(prompt_ids=[9, k, 7], max_tokens=300, ignore_eos=True,
                                                 request_id=request_id):
                    seen += len(getattr(event, "token_ids", []) or [])
                    if seen >= 2 + k:
                        await client.cancel(request_id)
            except RequestCancelled as e:
                return e.code
            return "finished"

        async def one(params: dict) -> tuple[str, list[int]]:
            result = await client.generate(**params)
            return params["request_id"], result.token_ids

        work = [one(p) for p in requests()] + [victim(k) for k in range(3)]
        done = await bounded(asyncio.gather(*work), 300)
        outputs, victims = dict(done[:-3]), done[-3:]
        assert victims == ["cancelled"] * 3
        for _ in range(100):  # the last frees ride on the scheduler's next message
            stats = await bounded(client.stats())
            if stats["kv_whole"] == 1 and stats["jobs_live"] == 0:
                break
            await asyncio.sleep(0.05)
    return outputs, stats


@pytest.fixture(scope="module")
def without_overlap():
    stack = Stack([*POOL, "scheduler.policy=fcfs", "scheduler.overlap=off"])
    try:
        outputs, stats = asyncio.run(serve(stack))
    finally:
        assert stack.stop() == 0
    assert stats["kv_whole"] == 1, stats
    return outputs


@pytest.mark.parametrize("policy", POLICIES)
async def test_overlap_gives_the_same_outputs_for_every_policy(policy, without_overlap):
    stack = Stack([*POOL, f"scheduler.policy={policy}", "scheduler.overlap=on"])
    try:
        outputs, stats = await serve(stack)
    finally:
        assert stack.stop() == 0
    assert outputs == without_overlap
    assert stats["jobs_carried"] > 0, stats  # decode jobs did go into a batch before their token came back
    assert stats["kv_whole"] == 1 and stats["jobs_live"] == 0, stats
    assert stats["device_blocks_free"] == stats["device_blocks_total"], stats
    assert stats["host_blocks_free"] == stats["host_blocks_total"], stats
    if policy in ("skip-join-mlfq", "mlfq"):
        assert stats["swaps_out"] > 0, stats  # the pool was small enough to swap
