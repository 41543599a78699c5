"""Codec: every registered message round-trips; malformed frames raise one DecodeError, never anything else."""

from __future__ import annotations

import dataclasses
import random
import types
import typing
from dataclasses import dataclass
from typing import Annotated

import msgpack
import numpy as np
import pytest

import common.messages  # noqa: F401  (registers the internal messages)
import common.protocol  # noqa: F401  (registers the client messages)
from common import codec
from common.codec import DecodeError, OneOf, Range
from common.messages import (BatchSampling, JobEvent, JobEvents, MsgType, SampledTokens, ScheduleBatch, StageBatch, Stats, SubmitJob,
                             SwapOp)


def _batch_columns(rng: random.Random) -> dict:
    """Per-job columns of equal length, as ScheduleBatch and StageBatch require."""
    n = rng.randint(0, 4)
    new = [rng.randint(1, 9) for _ in range(n)]
    sampling = BatchSampling([rng.uniform(0, 2) for _ in range(n)], [rng.randint(0, 50) for _ in range(n)],
                             [rng.uniform(0.1, 1) for _ in range(n)], [rng.choice([None, rng.randint(0, 99)]) for _ in range(n)],
                             [rng.randint(0, 99) for _ in range(n)])
    return dict(job_ids=list(range(n)), num_new_tokens=new, context_lens=[rng.randint(0, 99) for _ in range(n)],
                sampling=sampling, input_ids=np.arange(sum(new), dtype=np.int64))


def _schedule_batch(rng: random.Random) -> ScheduleBatch:
    cols = _batch_columns(rng)
    carry = [rng.choice([-1, 3]) if n == 1 else -1 for n in cols["num_new_tokens"]] if rng.random() < 0.5 else []
    return ScheduleBatch(batch_id=rng.randint(0, 99), **cols, freed_job_ids=[7],
                         run_order=[1, 0], in_flight_job_ids=[5], carry_from=carry)


def _stage_batch(rng: random.Random) -> StageBatch:
    cols = _batch_columns(rng)
    swap = SwapOp(op_id=1, job_id=3, direction=rng.choice(["in", "out"]), src_blocks=[1, 2], dst_blocks=[4, 5])
    hidden = np.ones((len(cols["input_ids"]), 4), np.float32) if rng.random() < 0.5 else None
    return StageBatch(batch_id=rng.randint(0, 99), **cols, block_tables=[[i] for i in cols["job_ids"]],
                      swap_out=[swap], swap_in=[], hidden=hidden, compute_s=rng.uniform(0, 1))


def _sampled_tokens(rng: random.Random) -> SampledTokens:
    n = rng.randint(0, 4)
    return SampledTokens(batch_id=rng.randint(0, 99), job_ids=list(range(n)), token_ids=[rng.randint(-1, 300) for _ in range(n)])


# Messages whose fields must agree with each other (per-job columns): built, not sampled field by field.
def _job_events(rng: random.Random) -> JobEvents:
    events = [JobEvent(rng.randint(0, 99), [rng.randint(0, 300) for _ in range(rng.randint(0, 3))],
                       rng.choice(["", "", "length", "error"]), "", "") for _ in range(rng.randint(0, 6))]
    return JobEvents.pack(events)


WITH_INVARIANTS = {ScheduleBatch: _schedule_batch, StageBatch: _stage_batch, SampledTokens: _sampled_tokens,
                   JobEvents: _job_events}


def sample(hint, rng: random.Random, depth: int = 0):
    """A valid value for an annotation, honouring Range and OneOf, so new messages are covered unchanged."""
    if hint in WITH_INVARIANTS:
        return WITH_INVARIANTS[hint](rng)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        base, meta = args[0], args[1:]
        for m in meta:
            if isinstance(m, OneOf):
                return rng.choice(m.values)
            if isinstance(m, Range):
                lo = m.lo if m.lo is not None else -5
                hi = m.hi if m.hi is not None else lo + 1000
                return rng.randint(int(lo), int(min(hi, lo + 1000))) if base is int else rng.uniform(lo, hi)
        return sample(base, rng, depth)
    if hint is int:
        return rng.randint(-(2**40), 2**40)
    if hint is float:
        return rng.uniform(-1e3, 1e3)
    if hint is str:
        return rng.choice(["", "a", "héllo", "€😀"])
    if hint is bool:
        return rng.random() < 0.5
    if hint is bytes:
        return rng.randbytes(5)
    if hint is np.ndarray:
        dtype = rng.choice([np.float32, np.float16, np.int64, np.int32, np.uint8])
        return (np.arange(12) * 3).astype(dtype).reshape(rng.choice([(12,), (3, 4), (2, 2, 3)]))
    if origin in (types.UnionType, typing.Union):
        alts = [a for a in args if a is not type(None)]
        if type(None) in args and rng.random() < 0.3:
            return None
        return sample(rng.choice(alts), rng, depth)
    if origin is list:
        return [sample(args[0], rng, depth + 1) for _ in range(rng.randint(0, 3 if depth < 2 else 1))]
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(sample(args[0], rng, depth + 1) for _ in range(rng.randint(0, 3)))
        return tuple(sample(a, rng, depth + 1) for a in args)
    if origin is dict:
        return {f"k{i}": sample(args[1], rng, depth + 1) for i in range(rng.randint(0, 3))}
    if dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint, include_extras=True)
        return hint(**{f.name: sample(hints[f.name], rng, depth + 1) for f in dataclasses.fields(hint)})
    raise AssertionError(f"no sampler for {hint!r}")


def same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("type_byte,cls", sorted(codec.registered().items()), ids=lambda v: getattr(v, "__name__", v))
def test_every_registered_message_round_trips(type_byte, cls):
    rng = random.Random(type_byte)
    for _ in range(25):
        msg = sample(cls, rng)
        frames = codec.encode(msg)
        assert frames[0] == bytes([type_byte])
        assert same(codec.decode(frames, cls), msg), msg
        assert same(codec.decode([bytes(f) for f in frames]), msg)  # as received, copied frames


def test_all_type_bytes_are_declared_in_msgtype():
    assert {int(t) for t in codec.registered()} <= {int(t) for t in MsgType}


def test_arrays_travel_as_raw_frames_and_decode_zero_copy():
    @codec.message(250)
    @dataclass(frozen=True)
    class Activations:
        hidden: np.ndarray  # [tokens, hidden] float16
        ids: np.ndarray | None  # [tokens] int64

    hidden = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float16)
    frames = codec.encode(Activations(hidden, None))
    assert len(frames) == 3 and bytes(frames[2]) == hidden.tobytes()
    payload = msgpack.unpackb(frames[1])
    assert payload["hidden"] == {"buf": 0, "dtype": "<f2", "shape": [5, 8]}
    received = bytearray(bytes(frames[2]))
    out = codec.decode([frames[0], frames[1], received])
    assert np.array_equal(out.hidden, hidden) and out.ids is None
    received[0:2] = b"\x00\x00"  # same memory: no copy was made
    assert out.hidden[0, 0] == 0
    with pytest.raises(DecodeError) as e:  # wrong size
        codec.decode([frames[0], frames[1], bytes(frames[2])[:-2]])
    assert e.value.code == codec.BAD_FRAMES
    with pytest.raises(DecodeError) as e:  # an extra frame nobody names
        codec.decode([*frames, b"xx"])
    assert e.value.code == codec.BAD_FRAMES
    bad = msgpack.packb({"hidden": {"buf": 0, "dtype": "|O8", "shape": [1]}, "ids": None})
    with pytest.raises(DecodeError) as e:  # object arrays never
        codec.decode([frames[0], bad, b"\x00" * 8])
    assert e.value.code == codec.BAD_FIELD


def job_event(**payload) -> list[bytes]:
    base = {"job_id": 1, "token_ids": [1, 2], "finish_reason": "", "error_code": "", "error_message": ""}
    base.update(payload)
    return [bytes([MsgType.JOB_EVENT]), msgpack.packb({k: v for k, v in base.items() if v is not ...})]


@pytest.mark.parametrize(
    "frames,code",
    [
        ([], codec.BAD_FRAMES),
        ([b"\x12"], codec.BAD_FRAMES),
        ([b"", b"\x80"], codec.BAD_FRAMES),
        ([b"\x12\x00", b"\x80"], codec.BAD_FRAMES),
        ([b"\xff", b"\x80"], codec.UNKNOWN_TYPE),
        ([bytes([MsgType.STATS]), b"\xc1"], codec.BAD_PAYLOAD),  # 0xc1 is never valid msgpack
        ([bytes([MsgType.STATS]), msgpack.packb([1, 2])], codec.BAD_FIELD),  # not a map
        ([bytes([MsgType.STATS]), msgpack.packb({"request_no": 1, "values": {"a": 1}}) + b"\x00"], codec.BAD_PAYLOAD),
        (job_event(job_id="1"), codec.BAD_FIELD),
        (job_event(job_id=True), codec.BAD_FIELD),  # a bool is not an int
        (job_event(job_id=-1), codec.BAD_FIELD),  # Range(0)
        (job_event(token_ids=[1, "2"]), codec.BAD_FIELD),
        (job_event(token_ids=(1, 2.0)), codec.BAD_FIELD),
        (job_event(finish_reason="done"), codec.BAD_FIELD),  # OneOf
        (job_event(error_code=None), codec.BAD_FIELD),
        (job_event(error_message=...), codec.BAD_FIELD),  # missing
        (job_event(extra=1), codec.BAD_FIELD),
        ([bytes([MsgType.STATS]), msgpack.packb({"request_no": 1, "values": {"a": "x"}})], codec.BAD_FIELD),
        ([bytes([MsgType.STATS]), msgpack.packb({"request_no": 1, "values": {1: 2}}, strict_types=False)],
         codec.BAD_PAYLOAD),
    ],
)
def test_malformed_frames_raise_decode_error_with_code(frames, code):
    with pytest.raises(DecodeError) as e:
        codec.decode(frames)
    assert e.value.code == code and e.value.message


def test_expected_type_is_enforced_and_floats_accept_ints():
    frames = codec.encode(Stats(3, {"free": 2, "util": 0.5}))
    with pytest.raises(DecodeError) as e:
        codec.decode(frames, (JobEvent, SubmitJob))
    assert e.value.code == codec.UNEXPECTED_TYPE
    payload = {"job_id": 1, "prompt_ids": [1], "max_tokens": 2, "temperature": 1, "top_k": 0, "top_p": 1,
               "seed": None, "stop_token_ids": [], "ignore_eos": False}
    msg = codec.decode([bytes([MsgType.SUBMIT_JOB]), msgpack.packb(payload)], SubmitJob)
    assert type(msg.temperature) is float and msg.temperature == 1.0


def test_numpy_scalars_encode_as_plain_numbers():
    msg = JobEvent(np.int64(4), [np.int64(7), np.int32(8)], "", "", "")
    assert codec.decode(codec.encode(msg)) == JobEvent(4, [7, 8], "", "", "")


def test_fuzzed_frames_never_raise_anything_but_decode_error():
    rng = random.Random(7)
    good = [codec.encode(sample(cls, rng)) for cls in codec.registered().values()]
    for i in range(3000):
        frames = [bytes(f) for f in rng.choice(good)]
        k = rng.randrange(len(frames))
        blob = bytearray(frames[k])
        for _ in range(rng.randint(1, 4)):
            if blob and rng.random() < 0.7:
                blob[rng.randrange(len(blob))] = rng.randrange(256)
            else:
                blob.insert(rng.randint(0, len(blob)), rng.randrange(256))
        frames[k] = bytes(blob)
        try:
            codec.decode(frames)
        except DecodeError:
            pass


def test_registration_rejects_mutable_and_duplicate_classes():
    with pytest.raises(TypeError):

        @codec.message(251)
        @dataclass
        class Mutable:
            x: int

    with pytest.raises(ValueError):

        @codec.message(MsgType.JOB_EVENT)
        @dataclass(frozen=True)
        class Clash:
            x: int

    with pytest.raises(TypeError):
        codec.encode(object())


def test_batch_columns_that_disagree_are_a_decode_error():
    good = _schedule_batch(random.Random(3))
    frames = codec.encode(good)
    payload = msgpack.unpackb(frames[1])
    payload["context_lens"] = payload["context_lens"] + [0]
    with pytest.raises(codec.DecodeError) as err:
        codec.decode([frames[0], msgpack.packb(payload), *frames[2:]], ScheduleBatch)
    assert err.value.code == codec.BAD_FIELD and "columns differ" in err.value.message
