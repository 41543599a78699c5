"""Ingress over real ZeroMQ sockets with the scheduler played by the test: validation, streaming, cancel."""

from __future__ import annotations

import os

import msgpack
import pytest

from common import codec
from common.messages import Alive, CancelJob, Exit, JobEvent, StatsRequest, SubmitJob
from common.protocol import PROTOCOL_VERSION, Cancel, ErrorEvent, FinishEvent, Generate, StatsQuery, TokenEvent
from services.ingress.validate import Limits
from test_ingress_harness import LIMITS, Harness, bounded


@pytest.fixture
async def h():
    harness = await Harness().start()
    yield harness
    await harness.close()


def gen(**fields) -> Generate:
    fields.setdefault("version", PROTOCOL_VERSION)
    fields.setdefault("max_tokens", 4)
    return Generate(**fields)


def raw(payload: dict, type_byte: int = 1) -> list[bytes]:
    return [bytes([type_byte]), msgpack.packb(payload)]


async def ask(h: Harness, dealer, frames) -> ErrorEvent:
    await dealer.send_multipart(frames)
    return await h.event(dealer)


async def test_malformed_requests_get_codes_then_a_good_request_is_served(h):
    d = h.dealer()
    cases = [
        ([os.urandom(40)], "invalid_request", ""),  # one frame of random bytes
        ([b"\x01", os.urandom(40)], "invalid_request", ""),  # random payload
        ([b"\xfe", msgpack.packb({"request_id": "u"})], "invalid_request", "u"),  # unknown type byte
        ([b"\x09", msgpack.packb({"request_id": "e"})], "invalid_request", "e"),  # a server event sent by a client
        (raw({"version": 2, "request_id": "t", "prompt": "hi", "max_tokens": "4"}), "invalid_request", "t"),
        (raw({"version": 2, "request_id": "p", "prompt": 7, "max_tokens": 4}), "invalid_request", "p"),
        (raw({"version": 2, "request_id": "x", "prompt": "hi", "max_tokens": 4, "colour": 1}), "invalid_request", "x"),
        (raw({"version": 2, "request_id": "s0", "prompt": "hi", "stop": [""]}), "invalid_request", "s0"),
        (raw({"version": 2, "request_id": "s1", "prompt": "hi", "stop": ["x"] * 17}), "invalid_request", "s1"),
        (raw({"version": 2, "request_id": "s2", "prompt": "hi", "stop": "x"}), "invalid_request", "s2"),
        (raw({"version": 2, "request_id": "l6", "prompt": "hi", "logprobs": 6}), "invalid_request", "l6"),
        (raw({"version": 2, "request_id": "n", "prompt": "hi", "max_tokens": -3}), "invalid_request", "n"),
        (raw({"version": 2, "request_id": "z", "prompt": "hi", "max_tokens": 0}), "invalid_request", "z"),
        (raw({"version": 2, "request_id": "h", "prompt": "hi", "max_tokens": 2**62}), "context_too_long", "h"),
        (raw({"version": 2, "request_id": "c", "prompt": "x" * 60, "max_tokens": 5}), "context_too_long", "c"),
        (raw({"version": 2, "request_id": "e0", "prompt": "", "max_tokens": 4}), "invalid_request", "e0"),
        (raw({"version": 2, "request_id": "e1", "prompt_ids": [], "max_tokens": 4}), "invalid_request", "e1"),
        (raw({"version": 2, "request_id": "b", "prompt": "a", "prompt_ids": [1], "max_tokens": 4}), "invalid_request", "b"),
        (raw({"version": 2, "request_id": "v", "prompt_ids": [1, 999], "max_tokens": 4}), "invalid_request", "v"),
        (raw({"version": 2, "request_id": "tp", "prompt": "a", "max_tokens": 4, "top_p": 0.0}), "invalid_request", "tp"),
        (raw({"version": 2, "request_id": "nan", "prompt": "a", "max_tokens": 4, "temperature": float("nan")}),
         "invalid_request", "nan"),
        (raw({"version": 1, "request_id": "ver", "prompt": "a", "max_tokens": 4}), "unsupported_version", "ver"),
        (raw({"version": 9, "request_id": "ver2", "prompt": "a", "max_tokens": 4, "novel": 1}), "unsupported_version",
         "ver2"),
    ]
    for frames, code, request_id in cases:
        ev = await ask(h, d, frames)
        assert isinstance(ev, ErrorEvent), (frames, ev)
        assert (ev.code, ev.request_id) == (code, request_id), (frames, ev)
        assert ev.message
    assert h.core.jobs == {}

    # cannot_fit: 44 tokens need 11 blocks of 4, fine; 52 need 13 > 12 blocks (context 64 allows it)
    small = Harness(Limits(vocab_size=259, max_context=64, block_size=4, num_gpu_blocks=12, max_jobs_in_system=4))
    await small.start()
    try:
        sd = small.dealer()
        ev = await ask(small, sd, codec.encode(gen(request_id="fit", prompt="x" * 40, max_tokens=12)))
        assert (ev.code, ev.request_id) == ("cannot_fit", "fit")
    finally:
        await small.close()

    await d.send_multipart(codec.encode(gen(request_id="good", prompt="ab", max_tokens=3, stream=False)))
    job = await h.submitted()
    assert isinstance(job, SubmitJob) and job.prompt_ids == [97, 98] and job.max_tokens == 3
    await h.emit(JobEvent(job.job_id, [99, 100], "", "", ""))
    await h.emit(JobEvent(job.job_id, [101], "length", "", ""))
    fin = await h.event(d)
    assert fin == FinishEvent("good", "length", [99, 100, 101], "cde", 2, 3)


async def test_duplicate_request_id_while_live_is_rejected_and_reusable_after(h):
    d = h.dealer()
    await d.send_multipart(codec.encode(gen(request_id="r1", prompt_ids=[5, 6])))
    job = await h.submitted()
    ev = await ask(h, d, codec.encode(gen(request_id="r1", prompt_ids=[7])))
    # named "": an error under "r1" would be a second final event for the live request
    assert (ev.code, ev.request_id) == ("invalid_request", "") and "'r1' is already live" in ev.message
    other = h.dealer()  # the same id on another connection is a different request
    await other.send_multipart(codec.encode(gen(request_id="r1", prompt_ids=[8])))
    job2 = await h.submitted()
    assert job2.prompt_ids == [8] and job2.job_id != job.job_id
    await h.emit(JobEvent(job.job_id, [1], "stop", "", ""))
    fin = await h.event(d)
    assert isinstance(fin, FinishEvent) and fin.request_id == "r1" and fin.finish_reason == "stop"
    await d.send_multipart(codec.encode(gen(request_id="r1", prompt_ids=[9])))
    assert (await h.submitted()).prompt_ids == [9]


async def test_overloaded_past_the_admission_bound_then_served_again(h):
    d = h.dealer()
    jobs = []
    for i in range(LIMITS.max_jobs_in_system):
        await d.send_multipart(codec.encode(gen(request_id=f"j{i}", prompt_ids=[1, 2])))
        jobs.append(await h.submitted())
    ev = await ask(h, d, codec.encode(gen(request_id="over", prompt_ids=[1])))
    assert (ev.code, ev.request_id) == ("overloaded", "over")
    await h.emit(JobEvent(jobs[0].job_id, [3], "length", "", ""))
    assert isinstance(await h.event(d), TokenEvent | FinishEvent)
    await d.send_multipart(codec.encode(gen(request_id="again", prompt_ids=[1])))
    assert isinstance(await h.submitted(), SubmitJob)


async def test_cancel_mid_stream_ends_with_cancelled_and_frees_the_slot_on_the_final_event(h):
    d = h.dealer()
    await d.send_multipart(codec.encode(gen(request_id="s", prompt="hello", max_tokens=10)))
    job = await h.submitted()
    await h.emit(JobEvent(job.job_id, [104], "", "", ""))
    assert await h.event(d) == TokenEvent("s", [104], "h")
    await d.send_multipart(codec.encode(Cancel("s")))
    ev = await h.event(d)
    assert (type(ev), ev.code, ev.request_id) == (ErrorEvent, "cancelled", "s")
    assert await h.submitted() == CancelJob(job.job_id)
    assert job.job_id in h.core.jobs  # still counted: the scheduler has not let it go yet
    await h.emit(JobEvent(job.job_id, [105], "", "", ""))  # in flight before the cancel landed: dropped
    await h.emit(JobEvent(job.job_id, [], "cancelled", "", ""))
    await d.send_multipart(codec.encode(StatsQuery("st")))
    req = await h.submitted()
    assert isinstance(req, StatsRequest)
    assert h.core.jobs == {}
    await d.send_multipart(codec.encode(Cancel("s")))  # cancelling again is ignored


async def test_streams_utf8_without_half_characters(h):
    d = h.dealer()
    text = "añ€😀!"
    await d.send_multipart(codec.encode(gen(request_id="u", prompt_ids=[1], max_tokens=20)))
    job = await h.submitted()
    data = list(text.encode("utf-8"))
    for t in data[:-1]:
        await h.emit(JobEvent(job.job_id, [t], "", "", ""))
    await h.emit(JobEvent(job.job_id, [data[-1]], "stop", "", ""))
    deltas, tokens = [], []
    while True:
        ev = await h.event(d)
        deltas.append(ev.text)
        tokens += ev.token_ids
        if isinstance(ev, FinishEvent):
            break
    assert "".join(deltas) == text and tokens == data
    assert all("\ufffd" not in s for s in deltas)
    assert deltas[:3] == ["a", "", "ñ"]  # the first byte of ñ waits for the second
    assert (ev.prompt_tokens, ev.completion_tokens) == (1, len(data))


async def test_scheduler_error_and_exit_end_requests_with_internal(h):
    d = h.dealer()
    await d.send_multipart(codec.encode(gen(request_id="a", prompt_ids=[1])))
    a = await h.submitted()
    await d.send_multipart(codec.encode(gen(request_id="b", prompt_ids=[2])))
    await h.submitted()
    await h.emit(JobEvent(a.job_id, [], "error", "internal", "stage 1 raised"))
    ev = await h.event(d)
    assert (ev.request_id, ev.code, ev.message) == ("a", "internal", "stage 1 raised")
    await h.emit(Exit("worker", 1, -9, Harness.TOKEN))
    ev = await h.event(d)
    assert (ev.request_id, ev.code) == ("b", "internal") and "worker" in ev.message
    ev = await ask(h, d, codec.encode(gen(request_id="c", prompt_ids=[2])))
    assert (ev.request_id, ev.code) == ("c", "unavailable")


async def test_a_forged_exit_changes_nothing_and_a_silent_scheduler_ends_every_request():
    h = await Harness(liveness_timeout_s=0.6).start()
    try:
        d = h.dealer()
        await h.emit(Alive("scheduler", -1, 100, True, 1))
        await d.send_multipart(codec.encode(gen(request_id="a", prompt_ids=[1])))
        await h.submitted()
        await h.emit(Exit("scheduler", -1, -9))  # without the launcher's token: dropped
        await h.emit(Exit("scheduler", -1, -9, "a guess"))
        await d.send_multipart(codec.encode(gen(request_id="b", prompt_ids=[2])))
        await h.submitted()  # still serving
        # no heartbeat follows: within the timeout (and a flush period) both end with `unavailable`
        events = [await bounded(h.event(d), 3.0) for _ in range(2)]
        assert sorted((ev.request_id, ev.code) for ev in events) == [("a", "unavailable"), ("b", "unavailable")]
        assert "no heartbeat" in events[0].message
        ev = await ask(h, d, codec.encode(gen(request_id="c", prompt_ids=[3])))
        assert (ev.request_id, ev.code) == ("c", "unavailable")
        await h.emit(Alive("scheduler", -1, 99, True, 5))  # an earlier incarnation's late heartbeat
        ev = await ask(h, d, codec.encode(gen(request_id="c", prompt_ids=[3])))
        assert ev.code == "unavailable"
        await h.emit(Alive("scheduler", -1, 200, True, 1))  # a restarted scheduler, up
        await bounded(h._until(lambda: h.core.ready))
        await d.send_multipart(codec.encode(gen(request_id="d", prompt_ids=[4])))
        assert isinstance(await h.submitted(), SubmitJob)
    finally:
        await h.close()


async def test_requests_before_the_stack_is_ready_get_unavailable():
    h = await Harness().start(ready=False)
    try:
        d = h.dealer()
        ev = await ask(h, d, codec.encode(gen(request_id="early", prompt="hi")))
        assert (ev.code, ev.request_id) == ("unavailable", "early")
        ev = await ask(h, d, codec.encode(StatsQuery("st")))
        assert (ev.code, ev.request_id) == ("unavailable", "st")
    finally:
        await h.close()


async def test_stats_forwarded_and_merged_and_timeout_answered():
    h = await Harness(stats_timeout_s=0.2).start()
    try:
        d = h.dealer()
        await d.send_multipart(codec.encode(StatsQuery("q1")))
        req = await h.submitted()
        from common.messages import Stats

        await h.emit(Stats(req.request_no, {"kv_free_blocks": 10, "kv_total_blocks": 12}))
        rep = await h.event(d)
        assert rep.request_id == "q1"
        assert rep.values["kv_free_blocks"] == 10 and rep.values["kv_total_blocks"] == 12
        assert rep.values["ingress_jobs_in_system"] == 0
        await d.send_multipart(codec.encode(StatsQuery("q2")))
        await h.submitted()  # never answered
        ev = await bounded(h.event(d), 2.0)
        assert (ev.request_id, ev.code) == ("q2", "unavailable")
    finally:
        await h.close()


async def test_a_server_assigned_id_never_collides_with_a_clients_own(h):
    d = h.dealer()
    # job 1 under the id the server would give the next request (job 2) if it did not check
    await d.send_multipart(codec.encode(gen(request_id="ingress-2", prompt_ids=[5, 6])))
    mine = await h.submitted()
    await d.send_multipart(codec.encode(gen(request_id="", prompt_ids=[7])))
    theirs = await h.submitted()
    await h.emit(JobEvent(theirs.job_id, [1], "stop", "", ""))
    fin = await h.event(d)
    assert isinstance(fin, FinishEvent) and fin.request_id not in ("", "ingress-2")
    await h.emit(JobEvent(mine.job_id, [2], "stop", "", ""))
    fin = await h.event(d)
    assert isinstance(fin, FinishEvent) and fin.request_id == "ingress-2"
