"""The ingress's pure parts: incremental detokenization, request checks, and the IngressCore state machine."""

from __future__ import annotations

import dataclasses
import random

import msgpack
import pytest

from common import codec
from common.codec import DecodeError
from common.messages import CancelJob, Exit, JobEvent, JobEvents, Ready, Stats, StatsRequest, SubmitJob
from common.protocol import Cancel, ErrorEvent, FinishEvent, Generate, StatsQuery, StatsReply, TokenEvent, TokenLogprobs
from services.ingress.core import IngressCore, ToClient, ToScheduler
from services.ingress.detok import IncrementalDetokenizer
from services.ingress.validate import Limits


class Bytes:
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")


class StrictBytes(Bytes):
    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode()  # raises on a split character


class Words:
    """A tokenizer whose rendering of a token depends on its neighbour (leading space), like SentencePiece."""

    vocab = ["hello", "world", "a", "b"]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.vocab[i] for i in ids)


LIMITS = Limits(vocab_size=259, max_context=32, block_size=4, num_gpu_blocks=6, max_jobs_in_system=2)


@pytest.mark.parametrize("tok", [Bytes(), StrictBytes()])
def test_detokenizer_deltas_are_whole_characters(tok):
    rng = random.Random(1)
    text = "plain ascii, ñandú, 漢字, 😀🎉 and a tail"
    data = list(text.encode())
    detok = IncrementalDetokenizer(tok.decode)
    deltas, i = [], 0
    while i < len(data):
        n = rng.randint(1, 3)
        deltas.append(detok.add(data[i : i + n]))
        i += n
    deltas.append(detok.flush())
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_detokenizer_keeps_context_dependent_spacing_and_flushes_incomplete_bytes():
    detok = IncrementalDetokenizer(Words().decode)
    assert [detok.add([0]), detok.add([1]), detok.add([2, 3])] == ["hello", " world", " a b"]
    tail = IncrementalDetokenizer(Bytes().decode)
    assert tail.add([0x61, 0xE2, 0x82]) == "a"  # the incomplete euro sign waits, "a" does not
    assert tail.flush() == "\ufffd"


def test_detokenizer_emits_invalid_bytes_instead_of_holding_them_forever():
    detok = IncrementalDetokenizer(Bytes().decode)
    deltas = [detok.add([0xB0]) for _ in range(8)]  # lone continuation bytes never complete a character
    assert deltas == ["", "", "", "\ufffd" * 4] * 2
    assert "".join(deltas) + detok.flush() == "\ufffd" * 8


def core(ready: bool = True, control_token: str = "") -> IngressCore:
    c = IngressCore(LIMITS, Bytes(), control_token=control_token)
    if ready:
        c.on_event(Ready("stack", -1))
    return c


def gen(**f) -> Generate:
    return Generate(**{"version": 2, "max_tokens": 4, **f})


def only(outs: list) -> object:
    assert len(outs) == 1, outs
    return outs[0].msg


@pytest.mark.parametrize(
    "request_fields,code",
    [
        (dict(prompt="ab", prompt_ids=[1]), "invalid_request"),
        (dict(), "invalid_request"),
        (dict(prompt=""), "invalid_request"),
        (dict(prompt_ids=[259]), "invalid_request"),
        (dict(prompt_ids=[-1]), "invalid_request"),
        (dict(prompt="a", stop_token_ids=[400]), "invalid_request"),
        (dict(prompt="a", top_p=0.0), "invalid_request"),
        (dict(prompt="a" * 29), "context_too_long"),  # 29 + 4 > 32
        (dict(prompt="a" * 21), "cannot_fit"),  # 25 tokens need 7 blocks of 4 > 6
        (dict(prompt="a", version=0), "unsupported_version"),
    ],
)
def test_generate_checks(request_fields, code):
    ev = only(core().on_client(b"c", gen(request_id="r", **request_fields)))
    assert isinstance(ev, ErrorEvent) and (ev.request_id, ev.code) == ("r", code), ev


def test_boundaries_are_inclusive():
    c = core()
    assert isinstance(only(c.on_client(b"c", gen(prompt="a" * 20))), SubmitJob)  # 24 tokens = 6 blocks
    big = IngressCore(Limits(259, 32, 4, 100, 2), Bytes())
    big.on_event(Ready("stack", -1))
    assert isinstance(only(big.on_client(b"c", gen(prompt="a" * 28))), SubmitJob)  # 28 + 4 = 32


def test_decode_errors_name_the_request_when_readable():
    import msgpack

    frames = [b"\x01", msgpack.packb({"version": 2, "request_id": "r9", "max_tokens": "x"})]
    ev = only(core().on_client(b"c", DecodeError("bad_field", "max_tokens: expected int"), frames))
    assert (ev.request_id, ev.code, ev.message) == ("r9", "invalid_request", "max_tokens: expected int")
    ev = only(core().on_client(b"c", DecodeError("bad_frames", "x"), [b"junk"]))
    assert (ev.request_id, ev.code) == ("", "invalid_request")


def test_job_lifecycle_streaming_and_non_streaming():
    c = core()
    a = only(c.on_client(b"c1", gen(request_id="a", prompt="hi", max_tokens=3)))
    b = only(c.on_client(b"c2", gen(request_id="b", prompt_ids=[1, 2], stream=False, seed=5, temperature=0.7)))
    assert (a.job_id, a.prompt_ids) == (1, [104, 105]) and (b.seed, b.temperature) == (5, 0.7)
    outs = c.on_event(JobEvent(a.job_id, [111], "", "", ""))
    assert outs == [ToClient(b"c1", TokenEvent("a", [111], "o"))]
    assert c.on_event(JobEvent(b.job_id, [65], "", "", "")) == []  # non-streaming waits for the end
    assert c.on_event(JobEvent(a.job_id, [], "", "", "")) == []  # nothing new: nothing to send
    outs = c.on_event(JobEvent(a.job_id, [107, 33], "length", "", ""))
    assert outs == [ToClient(b"c1", FinishEvent("a", "length", [107, 33], "k!", 2, 3))]
    outs = c.on_event(JobEvent(b.job_id, [66], "stop", "", ""))
    assert outs == [ToClient(b"c2", FinishEvent("b", "stop", [65, 66], "AB", 2, 2))]
    assert c.jobs == {} and c.live == {}
    assert c.on_event(JobEvent(a.job_id, [1], "", "", "")) == []  # late events of ended jobs are dropped


def test_admission_counts_jobs_until_the_scheduler_lets_go():
    c = core()
    j1 = only(c.on_client(b"c", gen(request_id="1", prompt="a")))
    only(c.on_client(b"c", gen(request_id="2", prompt="a")))
    assert only(c.on_client(b"c", gen(request_id="3", prompt="a"))).code == "overloaded"
    outs = c.on_client(b"c", Cancel("1"))
    assert outs == [ToClient(b"c", ErrorEvent("1", "cancelled", "cancelled by the client")), ToScheduler(CancelJob(1))]
    assert only(c.on_client(b"c", gen(request_id="3", prompt="a"))).code == "overloaded"  # not freed yet
    assert c.on_event(JobEvent(j1.job_id, [], "cancelled", "", "")) == []
    assert isinstance(only(c.on_client(b"c", gen(request_id="3", prompt="a"))), SubmitJob)
    assert c.on_client(b"c", Cancel("nope")) == []


def test_not_ready_then_exit_fails_everything():
    c = core(ready=False, control_token="launcher-token")
    assert only(c.on_client(b"c", gen(request_id="x", prompt="a"))).code == "unavailable"
    c.on_event(Ready("scheduler", -1))  # only the stack's readiness counts
    assert only(c.on_client(b"c", gen(request_id="x", prompt="a"))).code == "unavailable"
    c.on_event(Ready("stack", -1))
    only(c.on_client(b"c", gen(request_id="x", prompt="a")))
    req = only(c.on_client(b"d", StatsQuery("s")))
    assert isinstance(req, StatsRequest)
    for forged in ("", "guess"):  # only the launcher's token counts: a forged Exit changes nothing
        assert c.on_event(Exit("worker", 0, 1, forged)) == [] and c.ready
    outs = c.on_event(Exit("worker", 0, 1, "launcher-token"))
    assert {(o.msg.request_id, o.msg.code) for o in outs} == {("x", "internal"), ("s", "unavailable")}
    assert not c.ready and c.jobs == {} and c.pending_stats == {}


def test_stats_merge_and_error_codes_from_the_scheduler():
    c = core()
    req = only(c.on_client(b"c", StatsQuery("s")))
    rep = only(c.on_event(Stats(req.request_no, {"kv_free_blocks": 6, "kv_total_blocks": 6})))
    assert isinstance(rep, StatsReply) and rep.request_id == "s"
    assert rep.values["kv_free_blocks"] == 6 and rep.values["ingress_requests_accepted"] == 0
    assert c.stats_timeout(req.request_no) == []  # answered already
    job = only(c.on_client(b"c", gen(request_id="e", prompt="a")))
    ev = only(c.on_event(JobEvent(job.job_id, [], "error", "weird_code", "")))
    assert (ev.code, ev.message) == ("internal", "the job failed")


def test_admission_bounds_the_kv_the_admitted_jobs_may_need():
    # 6 device + 10 host blocks of 4 tokens; each job below may need ceil((2 + 10) / 4) = 3 blocks
    limits = Limits(vocab_size=259, max_context=32, block_size=4, num_gpu_blocks=6, max_jobs_in_system=100,
                    num_host_blocks=10)
    c = IngressCore(limits, Bytes())
    c.on_event(Ready("stack", -1))
    jobs = [only(c.on_client(b"c", gen(request_id=str(i), prompt="ab", max_tokens=10))) for i in range(5)]
    assert all(isinstance(j, SubmitJob) for j in jobs) and c.kv_reserved == 15
    refused = only(c.on_client(b"c", gen(request_id="6", prompt="ab", max_tokens=10)))
    assert refused.code == "overloaded" and "KV blocks" in refused.message
    small = only(c.on_client(b"c", gen(request_id="7", prompt="a", max_tokens=3)))  # 1 block still fits
    assert isinstance(small, SubmitJob) and c.kv_reserved == 16
    c.on_event(JobEvent(jobs[0].job_id, [1] * 10, "length", "", ""))  # its blocks count until the scheduler's end
    assert c.kv_reserved == 13
    assert isinstance(only(c.on_client(b"c", gen(request_id="6", prompt="ab", max_tokens=10))), SubmitJob)
    c.fail_all("gone")
    assert c.kv_reserved == 0


def test_without_a_host_pool_or_with_the_bound_off():
    limits = Limits(vocab_size=259, max_context=32, block_size=4, num_gpu_blocks=6, max_jobs_in_system=100)
    c = IngressCore(limits, Bytes())
    c.on_event(Ready("stack", -1))
    assert isinstance(only(c.on_client(b"c", gen(request_id="a", prompt="ab", max_tokens=22))), SubmitJob)  # 6 blocks
    assert only(c.on_client(b"c", gen(request_id="b", prompt="a", max_tokens=1))).code == "overloaded"
    off = IngressCore(dataclasses.replace(limits, kv_overcommit=0.0), Bytes())
    off.on_event(Ready("stack", -1))
    for i in range(20):
        assert isinstance(only(off.on_client(b"c", gen(request_id=str(i), prompt="ab", max_tokens=22))), SubmitJob)


def roomy() -> IngressCore:
    c = IngressCore(dataclasses.replace(LIMITS, max_jobs_in_system=16, num_gpu_blocks=64), Bytes())
    c.on_event(Ready("stack", -1))
    return c


def _fresh_jobs(c: IngressCore, **f) -> list:
    jobs = [only(c.on_client(b"c", gen(request_id=f"r{k}", prompt="hi", max_tokens=9, **f))) for k in range(4)]
    return [j.job_id for j in jobs]


def test_one_iterations_events_as_columns_give_what_the_events_give_one_by_one():
    events = lambda ids: [  # noqa: E731 - one iteration's events, for jobs of two fresh cores
        JobEvent(ids[0], [104], "", "", ""),
        JobEvent(ids[1], [105, 33], "", "", ""),
        JobEvent(ids[2], [65], "", "", "", [TokenLogprobs(-0.5, [65], [-0.5])]),
        JobEvent(ids[3], [66], "length", "", ""),
        JobEvent(ids[1], [], "cancelled", "", ""),
    ]
    one_by_one, columns = roomy(), roomy()
    expected = [out for ev in events(_fresh_jobs(one_by_one, stop=["i!"])) for out in one_by_one.on_event(ev)]
    packed = JobEvents.pack(events(_fresh_jobs(columns, stop=["i!"])))
    assert packed.job_ids == [packed.job_ids[0], packed.job_ids[0] + 1] and packed.num_tokens == [1, 2]
    assert [e.finish_reason for e in packed.events] == ["", "length", "cancelled"]  # logprobs and ends follow
    decoded = codec.decode(codec.encode(packed), JobEvents)
    assert columns.on_event(decoded) == expected
    assert columns.jobs.keys() == one_by_one.jobs.keys() and columns.kv_reserved == one_by_one.kv_reserved
    assert any(isinstance(o.msg, CancelJob) for o in expected)  # r1's stop string ended it at once


def test_job_events_whose_counts_do_not_cover_the_tokens_are_refused_by_the_codec():
    type_byte, payload = codec.encode(JobEvents([1, 2], [1, 1], [5, 6], []))
    assert codec.decode([type_byte, payload], JobEvents).num_tokens == [1, 1]
    for counts in ([1, 2], [2], [3, -1]):  # more tokens than given, a job without a count, a negative count
        fields = msgpack.unpackb(payload)
        fields["num_tokens"] = counts
        with pytest.raises(DecodeError):
            codec.decode([type_byte, msgpack.packb(fields)], JobEvents)


def test_token_events_of_requests_that_ask_for_batches_are_marked_and_others_are_not():
    c = roomy()
    batched = only(c.on_client(b"c", gen(request_id="a", prompt="hi", batch_events=True)))
    single = only(c.on_client(b"c", gen(request_id="b", prompt="hi")))
    outs = c.on_event(JobEvents.pack([JobEvent(batched.job_id, [104], "", "", ""), JobEvent(single.job_id, [105], "", "", "")]))
    assert [(o.msg.request_id, o.batch) for o in outs] == [("a", True), ("b", False)]
    (final,) = c.on_event(JobEvent(batched.job_id, [33], "length", "", ""))
    assert isinstance(final.msg, FinishEvent) and not final.batch  # final events always travel alone
