"""The whole stack as processes with the tiny model: outputs equal the in-process reference."""

from __future__ import annotations

import asyncio
import os
import random
import signal

import pytest

from common.client import AsyncClient, InternalError, RequestCancelled
from stack import Stack
from workers.model.sampling import SamplingParams
from workers.offline import OfflineEngine


def make_requests(n: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(256) for _ in range(rng.randint(1, 48))], rng.randint(1, 40)) for _ in range(n)]


def reference(requests: list[tuple[list[int], int]]) -> list[list[int]]:
    engine = OfflineEngine.build("tiny", num_stages=1, num_blocks=2048)
    params = [SamplingParams(max_tokens=m) for _, m in requests]
    return engine.generate([p for p, _ in requests], params)


async def bounded(coro, seconds: float = 120.0):
    return await asyncio.wait_for(coro, seconds)


@pytest.fixture(scope="module")
def stack():
    s = Stack(["scheduler.policy=fcfs", "cache.swap=defer", "scheduler.max_jobs=16"])
    yield s
    assert s.stop() == 0


async def test_64_concurrent_requests_equal_offline_generate(stack):
    requests = make_requests(64, seed=1)
    expected = reference(requests)
    async with AsyncClient(stack.endpoint, timeout=120) as client:
        results = await bounded(
            asyncio.gather(*(client.generate(prompt_ids=p, max_tokens=m) for p, m in requests))
        )
        for (prompt, max_tokens), result, want in zip(requests, results, expected):
            assert result.token_ids == want, f"prompt {prompt} max_tokens {max_tokens}"
            assert result.prompt_tokens == len(prompt)
            assert result.completion_tokens == len(want)
        stats = await bounded(client.stats())
    assert stats["jobs_finished"] >= 64
    assert stats["kv_free_blocks"] == stats["kv_total_blocks"]


async def test_a_tiny_temperature_never_fails_its_batch_mates(stack):
    """A temperature of 1e-45 is inside the protocol's [0, 100]; dividing logits by it overflowed and
    failed every job of its batch. Now it samples greedily and its 7 batch-mates finish normally."""
    requests = make_requests(8, seed=5)
    expected = reference(requests)
    temperatures = [1e-45, 1e-30, 0.0, 0.0, 1e-45, 0.0, 0.0, 0.0]
    async with AsyncClient(stack.endpoint, timeout=120) as client:
        results = await bounded(asyncio.gather(*(
            client.generate(prompt_ids=p, max_tokens=m, temperature=t, seed=3)
            for (p, m), t in zip(requests, temperatures)
        )))
        stats = await bounded(client.stats())
    assert [r.token_ids for r in results] == expected  # greedy, like the temperature-0 reference
    assert stats["kv_free_blocks"] == stats["kv_total_blocks"]


async def test_cancel_mid_stream_ends_cancelled_and_pool_is_whole(stack):
    async with AsyncClient(stack.endpoint, timeout=120) as client:

        async def cancel_after(n_tokens: int, request_id: str) -> str:
            seen = 0
            try:
                async for event in client.stream(prompt_ids=[5, 6, 7], max_tokens=400, request_id=request_id,
                                                 ignore_eos=True):
                    seen += len(getattr(event, "token_ids", []) or [])
                    if seen >= n_tokens:
                        await client.cancel(request_id)
            except RequestCancelled as e:
                return e.code
            return "finished"

        outcomes = await bounded(asyncio.gather(*(cancel_after(3 + k, f"c{k}") for k in range(8))))
        assert outcomes == ["cancelled"] * 8
        for _ in range(50):  # frees reach the KV manager with the next scheduler message
            stats = await bounded(client.stats())
            if stats["kv_free_blocks"] == stats["kv_total_blocks"] and stats["jobs_live"] == 0:
                break
            await asyncio.sleep(0.05)
        assert stats["kv_free_blocks"] == stats["kv_total_blocks"]
        assert stats["jobs_cancelled"] >= 8
        # the stack still serves afterwards
        result = await bounded(client.generate(prompt_ids=[1, 2, 3], max_tokens=4))
        assert result.token_ids == reference([([1, 2, 3], 4)])[0]


async def test_killing_a_worker_fails_every_request_and_stops_the_stack():
    stack = Stack(["scheduler.policy=fcfs", "cache.swap=defer", "scheduler.max_jobs=4"])
    try:
        async with AsyncClient(stack.endpoint, timeout=120) as client:
            tasks = [asyncio.create_task(client.generate(prompt_ids=[k + 1, 2], max_tokens=600, ignore_eos=True))
                     for k in range(12)]
            # wait until tokens flow, then kill the last stage
            async for _ in client.stream(prompt_ids=[9], max_tokens=3):
                pass
            pids = stack.worker_pids()
            assert len(pids) == 2
            os.kill(pids[-1], signal.SIGKILL)
            outcomes = await bounded(asyncio.gather(*tasks, return_exceptions=True), 60)
        assert all(isinstance(o, InternalError) for o in outcomes), outcomes
        assert all(o.code == "internal" for o in outcomes)
        assert stack.wait(60) != 0
    finally:
        stack.stop()


async def test_malformed_traffic_gets_error_codes_and_the_stack_keeps_serving(stack):
    """Raw frames (as any client could send them) against the real stack, then a good request."""
    import msgpack
    import zmq
    import zmq.asyncio

    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(stack.endpoint)

    def generate(**fields) -> list[bytes]:
        return [b"\x01", msgpack.packb({"version": 2, **fields})]

    cases = [
        ([b"\x93\x00garbage"], "invalid_request"),  # one frame of random bytes
        ([b"\xc8", msgpack.packb({"x": 1})], "invalid_request"),  # unknown type byte
        (generate(request_id="t1", prompt_ids="abc", max_tokens=3), "invalid_request"),  # wrong type
        (generate(request_id="t2", prompt_ids=[1, 2], max_tokens=-4), "invalid_request"),
        (generate(request_id="t3", prompt_ids=[1, 2], max_tokens=10**9), "context_too_long"),
        (generate(request_id="t4", prompt_ids=[5] * 2040, max_tokens=20), "context_too_long"),
        (generate(request_id="t5", prompt_ids=[], max_tokens=3), "invalid_request"),
        (generate(request_id="t6", prompt_ids=[1, 99999], max_tokens=3), "invalid_request"),
    ]
    try:
        for frames, code in cases:
            await sock.send_multipart(frames)
            reply = await bounded(sock.recv_multipart(), 30)
            assert reply[0] == b"\x0a", (frames, reply)
            event = msgpack.unpackb(reply[1])
            assert event["code"] == code, (frames, event)
        # a duplicate live request id on one connection
        await sock.send_multipart(generate(request_id="dup", prompt_ids=[1], max_tokens=200, stream=False))
        await sock.send_multipart(generate(request_id="dup", prompt_ids=[1], max_tokens=2, stream=False))
        replies = [await bounded(sock.recv_multipart(), 60) for _ in range(2)]
        kinds = sorted((r[0], msgpack.unpackb(r[1]).get("code", "")) for r in replies)
        assert kinds == [(b"\x09", ""), (b"\x0a", "invalid_request")], kinds
    finally:
        sock.close(linger=0)
        ctx.term()
    async with AsyncClient(stack.endpoint, timeout=60) as client:
        result = await bounded(client.generate(prompt_ids=[4, 5, 6], max_tokens=5))
    assert result.token_ids == reference([([4, 5, 6], 5)])[0]


async def test_an_oversized_frame_is_refused_while_another_client_is_served(stack):
    """A frame over the ingress limit (64 KiB + 16 bytes a context token) is dropped by ZeroMQ with its
    connection, before ingress buffers or decodes it; a normal client meanwhile gets its reply on time."""
    import msgpack
    import zmq
    import zmq.asyncio

    ctx = zmq.asyncio.Context()
    big = ctx.socket(zmq.DEALER)
    big.setsockopt(zmq.LINGER, 0)
    big.connect(stack.endpoint)
    try:
        huge = {"version": 2, "request_id": "huge", "prompt": "x" * (8 << 20), "max_tokens": 1}
        async with AsyncClient(stack.endpoint, timeout=60) as client:
            for _ in range(4):
                await big.send_multipart([b"\x01", msgpack.packb(huge)])
            result = await bounded(client.generate(prompt_ids=[4, 5, 6], max_tokens=5), 20)
            assert result.token_ids == reference([([4, 5, 6], 5)])[0]
            with pytest.raises(asyncio.TimeoutError):  # no reply: the connection was dropped unread
                await asyncio.wait_for(big.recv_multipart(), 2.0)
            stats = await bounded(client.stats())
        assert stats["jobs_submitted"] >= 1  # ingress is alive and answering
    finally:
        big.close(linger=0)
        ctx.term()


async def test_a_client_written_from_the_protocol_doc_streams_from_the_stack(stack):
    """Plain pyzmq + msgpack, as docs/PROTOCOL.md describes: DEALER, [type byte, msgpack map] frames."""
    import msgpack
    import zmq
    import zmq.asyncio

    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(stack.endpoint)
    try:
        request = {"version": 2, "request_id": "doc-1", "prompt_ids": [7, 8, 9], "max_tokens": 12,
                   "stream": True, "ignore_eos": True}
        await sock.send_multipart([bytes([1]), msgpack.packb(request)])
        tokens, streamed = [], 0
        while True:
            type_byte, payload = await bounded(sock.recv_multipart(), 60)
            event = msgpack.unpackb(payload)
            assert event["request_id"] == "doc-1"
            tokens += event.get("token_ids", [])
            if type_byte == bytes([8]):
                streamed += 1
                continue
            assert type_byte == bytes([9]), event  # FinishEvent
            break
    finally:
        sock.close(linger=0)
        ctx.term()
    assert streamed >= 1
    assert (event["finish_reason"], event["prompt_tokens"], event["completion_tokens"]) == ("length", 3, 12)
    engine = OfflineEngine.build("tiny", num_stages=1, num_blocks=64)
    assert tokens == engine.generate([[7, 8, 9]], [SamplingParams(max_tokens=12, ignore_eos=True)])[0]
