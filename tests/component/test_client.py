"""The client library against a real ingress (scheduler played by the test): results, streams, errors."""

from __future__ import annotations

import asyncio

import pytest

from common.client import (
    AsyncClient,
    Client,
    ContextTooLong,
    FastServeError,
    InvalidRequest,
    RequestCancelled,
    RequestTimeout,
    Unavailable,
)
from common.protocol import FinishEvent, TokenEvent
from test_ingress_harness import Harness, bounded


@pytest.fixture
async def h():
    harness = await Harness().start()
    harness.serve_automatically()
    yield harness
    await harness.close()


async def test_generate_and_concurrent_streams(h):
    async with AsyncClient(h.address, timeout=5) as client:
        result = await client.generate("abc", max_tokens=5)
        assert (result.text, result.token_ids, result.finish_reason) == ("abcab", [97, 98, 99, 97, 98], "length")
        assert (result.prompt_tokens, result.completion_tokens) == (3, 5)

        async def collect(prompt: str, n: int) -> tuple[str, FinishEvent]:
            text = ""
            async for event in client.stream(prompt, max_tokens=n):
                text += event.text
            assert isinstance(event, FinishEvent)
            return text, event

        prompts = [("xyz", 7), ("ñ€", 10), ("q", 3), ("hello", 12)]
        outs = await bounded(asyncio.gather(*(collect(p, n) for p, n in prompts)))
        for (prompt, n), (text, fin) in zip(prompts, outs):
            data = prompt.encode()
            assert text == bytes(data[i % len(data)] for i in range(n)).decode(errors="replace")
            assert fin.completion_tokens == n

        stop = await client.generate(prompt_ids=[5, 6, 7, 8], max_tokens=10, stop_token_ids=[7])
        assert (stop.token_ids, stop.finish_reason) == ([5, 6, 7], "stop")


async def test_errors_are_raised_with_protocol_codes(h):
    async with AsyncClient(h.address, timeout=5) as client:
        with pytest.raises(ContextTooLong) as e:
            await client.generate("x" * 60, max_tokens=10, request_id="long")
        assert e.value.code == "context_too_long" and e.value.request_id == "long"
        with pytest.raises(InvalidRequest):
            await client.generate("", max_tokens=3)
        with pytest.raises(InvalidRequest):
            await client.generate("a", max_tokens=-1)
        with pytest.raises(FastServeError):
            async for _ in client.stream(prompt_ids=[1, 300], max_tokens=2):
                pass


async def test_cancel_mid_stream_and_the_pool_is_whole_after(h):
    async with AsyncClient(h.address, timeout=5) as client:
        seen = []
        with pytest.raises(RequestCancelled):
            async for event in client.stream("abcdef", max_tokens=40, request_id="c1"):
                assert isinstance(event, TokenEvent)
                seen.append(event)
                if len(seen) == 3:
                    await client.cancel("c1")
        assert len(seen) >= 3
        # leaving a stream early cancels it too
        async for event in client.stream("zz", max_tokens=40, request_id="c2"):
            break
        for _ in range(200):  # the fake scheduler frees the jobs' blocks when it sees the cancels
            stats = await client.stats()
            if stats["ingress_jobs_in_system"] == 0:
                break
            await asyncio.sleep(0.01)
        assert stats["kv_free_blocks"] == stats["kv_total_blocks"] == 12
        assert stats["ingress_jobs_in_system"] == 0


async def test_timeout_and_unavailable():
    h = await Harness().start()  # nobody plays the scheduler: requests never progress
    try:
        async with AsyncClient(h.address, timeout=0.2) as client:
            with pytest.raises(RequestTimeout) as e:
                await client.generate("abc", max_tokens=3, request_id="slow")
            assert e.value.code == "timeout" and e.value.request_id == "slow"
            await bounded(h.submitted())  # the SubmitJob
            assert (await bounded(h.submitted())).job_id == 1  # the CancelJob sent on timeout
    finally:
        await h.close()
    h = await Harness().start(ready=False)
    try:
        async with AsyncClient(h.address, timeout=1) as client:
            with pytest.raises(Unavailable):
                await client.generate("abc", max_tokens=3)
            with pytest.raises(Unavailable):
                await client.wait_ready(timeout=0.2)
    finally:
        await h.close()


def test_blocking_client_generate_stream_and_stats():
    async def serve(ready: asyncio.Event, stop: asyncio.Event, box: list) -> None:
        harness = await Harness().start()
        harness.serve_automatically()
        box.append(harness.address)
        ready.set()
        await stop.wait()
        await harness.close()

    import threading

    loop = asyncio.new_event_loop()
    box: list = []
    ready, stop = asyncio.Event(), asyncio.Event()
    thread = threading.Thread(target=lambda: loop.run_until_complete(serve(ready, stop, box)))
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(asyncio.wait_for(ready.wait(), 5), loop).result()
        with Client(box[0], timeout=5) as client:
            assert client.generate("hey", max_tokens=4).text == "heyh"
            events = list(client.stream("ab", max_tokens=3))
            assert "".join(e.text for e in events) == "aba" and isinstance(events[-1], FinishEvent)
            assert client.stats()["kv_total_blocks"] == 12
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()
