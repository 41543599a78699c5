"""IngressCore's stop strings, default max_tokens and logprobs, and the client lease book (pure)."""

from __future__ import annotations

import pytest

from common.messages import CancelJob, JobEvent, Ready, SubmitJob, TokenLogprobs
from common.protocol import ErrorEvent, FinishEvent, Generate, Heartbeat, TokenEvent
from services.ingress.core import IngressCore, ToClient, ToScheduler
from services.ingress.leases import Leases
from services.ingress.validate import Limits


class Bytes:
    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode(errors="replace")


def core(max_context: int = 64, default_max_tokens: int = 20) -> IngressCore:
    c = IngressCore(Limits(259, max_context, 4, 1000, 8, default_max_tokens), Bytes())
    c.on_event(Ready("stack", -1))
    return c


def submit(c: IngressCore, **fields) -> SubmitJob:
    (out,) = c.on_client(b"c", Generate(version=2, request_id="r", prompt="ab", **fields))
    assert isinstance(out, ToScheduler), out
    return out.msg


def feed(c: IngressCore, job: SubmitJob, text: str, final: str = "") -> list:
    """One job event per byte of text (a byte-level model), the last one with `final`."""
    outs = []
    for i, b in enumerate(text.encode()):
        outs += c.on_event(JobEvent(job.job_id, [b], final if i == len(text.encode()) - 1 else "", "", ""))
    return outs


def test_default_max_tokens_is_capped_by_the_context_left():
    assert submit(core()).max_tokens == 20
    assert submit(core(max_context=12)).max_tokens == 10  # 2 prompt tokens leave 10
    assert submit(core(), max_tokens=7).max_tokens == 7
    (out,) = core(max_context=2).on_client(b"c", Generate(version=2, request_id="r", prompt="ab"))
    assert out.msg.code == "context_too_long"


def test_a_stop_string_across_events_is_never_sent_and_cancels_the_job():
    c = core()
    job = submit(c, stop=["STOP", "xyz"])
    outs = feed(c, job, "abcST")
    text = "".join(o.msg.text for o in outs)
    assert text == "ab"  # "cST" may begin "STOP": held back
    outs = feed(c, job, "OP and more")  # events after the match are the cancelled job's: dropped
    assert [o.msg for o in outs] == [TokenEvent("r", [79], "c"), FinishEvent("r", "stop", [80], "", 2, 7),
                                     CancelJob(job.job_id)]
    assert (b"c", "r") not in c.live
    assert job.job_id in c.jobs  # counted until the scheduler lets go
    assert c.on_event(JobEvent(job.job_id, [], "cancelled", "", "")) == [] and c.jobs == {}


def test_held_back_text_comes_out_at_the_end_and_a_stop_in_the_last_event_needs_no_cancel():
    c = core()
    job = submit(c, stop=["zz"], stream=False)
    outs = feed(c, job, "abz", final="length")
    assert [o.msg for o in outs] == [FinishEvent("r", "length", [97, 98, 122], "abz", 2, 3)]
    job = submit(c, stop=["bz"])
    outs = feed(c, job, "abz", final="length")
    assert [type(o.msg) for o in outs] == [TokenEvent, TokenEvent, FinishEvent]
    assert outs[-1].msg.finish_reason == "stop" and "".join(o.msg.text for o in outs) == "a"
    assert c.jobs == {}


def test_logprobs_are_asked_for_and_delivered_with_their_tokens():
    c = core()
    job = submit(c, logprobs=2)
    assert job.logprobs == 2
    first, last = TokenLogprobs(-0.1, [65, 66], [-0.1, -2.0]), TokenLogprobs(-0.2, [67, 68], [-0.2, -3.0])
    (out,) = c.on_event(JobEvent(job.job_id, [65], "", "", "", [first]))
    assert out.msg == TokenEvent("r", [65], "A", [first])
    (out,) = c.on_event(JobEvent(job.job_id, [67], "length", "", "", [last]))
    assert out.msg.logprobs == [last]
    assert submit(core()).logprobs is None


def test_heartbeats_are_requests_with_no_reply():
    assert core().on_client(b"c", Heartbeat()) == []


def test_a_client_silent_for_its_lease_is_reported_once_and_a_message_renews_it():
    leases = Leases(1.0)
    leases.heard(b"a", 0.0)
    leases.heard(b"b", 0.5)
    leases.heard(b"a", 0.9)  # renewed
    assert leases.expired(1.4) == []
    assert leases.expired(1.5) == [b"b"]
    assert leases.expired(1.6) == []  # b is reported once
    assert leases.expired(2.0) == [b"a"] and len(leases) == 0


def test_time_ingress_did_not_run_does_not_count_against_clients():
    leases = Leases(1.0)
    leases.heard(b"a", 0.0)
    assert leases.expired(0.4) == []
    assert leases.expired(5.0) == []  # 4.6 s without a sweep: ingress was stalled, a's heartbeats wait unread
    leases.heard(b"b", 5.1)
    assert leases.expired(5.3) == []  # a was silent 0.4 + 0.3 s of ingress's running time
    assert leases.expired(5.7) == [b"a"]
    assert leases.expired(6.1) == [b"b"]


def test_only_clients_with_live_requests_have_anything_to_cancel():
    c = core()
    submit(c)
    assert c.has_live(b"c") and not c.has_live(b"d")
    outs = c.drop_client(b"c", "the client sent nothing for 1 s (its lease expired)")
    assert isinstance(outs[0], ToClient) and isinstance(outs[0].msg, ErrorEvent) and outs[0].msg.code == "cancelled"
    assert outs[1] == ToScheduler(CancelJob(1)) and not c.has_live(b"c")


@pytest.mark.parametrize("stop", [["ab", "b"], ["b", "ab"]])
def test_the_earliest_stop_string_wins(stop):
    c = core()
    job = submit(c, stop=stop, stream=False)
    (out, _) = feed(c, job, "xab")
    assert (out.msg.finish_reason, out.msg.text) == ("stop", "x")
