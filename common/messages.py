"""Every wire type byte (MsgType) and the internal messages between the processes of the stack."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Annotated

from common.codec import OneOf, Range, message


class MsgType(IntEnum):
    """The first frame of every message. Values are stable wire constants: add, never renumber."""

    # 1..15: client protocol (common/protocol.py, docs/PROTOCOL.md)
    GENERATE = 1
    CANCEL = 2
    STATS_QUERY = 3
    TOKEN_EVENT = 8
    FINISH_EVENT = 9
    ERROR_EVENT = 10
    STATS_REPLY = 11
    # 16..31: ingress <-> scheduler, and process lifecycle
    SUBMIT_JOB = 16
    CANCEL_JOB = 17
    JOB_EVENT = 18
    STATS_REQUEST = 19
    STATS = 20
    READY = 21
    EXIT = 22
    # 32..127: scheduler, KV-cache manager and stage workers


FINISH_REASONS = ("", "stop", "length", "cancelled", "error")  # "" while the job runs

JobId = Annotated[int, Range(0)]  # ingress-assigned, unique for the life of the ingress process


@message(MsgType.SUBMIT_JOB)
@dataclass(frozen=True)
class SubmitJob:
    """Ingress -> scheduler: a validated, tokenized job that fits the context and the KV pool."""

    job_id: JobId
    prompt_ids: list[int]  # [prompt_len] token ids, non-empty
    max_tokens: Annotated[int, Range(1)]  # output tokens at most
    temperature: Annotated[float, Range(0.0)]  # 0 = greedy
    top_k: Annotated[int, Range(0)]  # 0 = no top-k cut
    top_p: Annotated[float, Range(0.0, 1.0)]  # nucleus mass; 1.0 = no cut
    seed: int | None  # per-job sampling seed; None = unseeded
    stop_token_ids: list[int]  # generating any of these ends the job with "stop" (the token is emitted)
    ignore_eos: bool  # when false, the model's EOS ids also stop the job


@message(MsgType.CANCEL_JOB)
@dataclass(frozen=True)
class CancelJob:
    """Ingress -> scheduler: drop this job; the scheduler answers with a final JobEvent "cancelled"."""

    job_id: JobId


@message(MsgType.JOB_EVENT)
@dataclass(frozen=True)
class JobEvent:
    """Scheduler -> ingress: new tokens of a job, and its end when finish_reason is not empty."""

    job_id: JobId
    token_ids: list[int]  # tokens generated since the last event, in order; may be empty
    finish_reason: Annotated[str, OneOf(FINISH_REASONS)]  # "" while running; set on the job's last event
    error_code: str  # protocol error code when finish_reason is "error" (e.g. "internal"), else ""
    error_message: str  # human-readable cause when finish_reason is "error", else ""


@message(MsgType.STATS_REQUEST)
@dataclass(frozen=True)
class StatsRequest:
    """Ingress -> scheduler: ask for counters; the reply carries the same request_no."""

    request_no: Annotated[int, Range(0)]  # ingress-chosen, echoed in Stats


@message(MsgType.STATS)
@dataclass(frozen=True)
class Stats:
    """Scheduler -> ingress: counters, including the KV pool's kv_free_blocks and kv_total_blocks."""

    request_no: Annotated[int, Range(0)]  # the StatsRequest this answers
    values: dict[str, int | float]  # counter name -> value (blocks, jobs, seconds)


@message(MsgType.READY)
@dataclass(frozen=True)
class Ready:
    """A process is bound and ready. The scheduler sends Ready("stack", -1) to ingress once all are."""

    role: str  # "ingress" | "scheduler" | "kvcache" | "worker" | "stack"
    stage: int  # stage index for workers, -1 otherwise


@message(MsgType.EXIT)
@dataclass(frozen=True)
class Exit:
    """A process is stopping (to the launcher); sent to ingress, it fails every live request."""

    role: str  # as in Ready
    stage: int  # stage index for workers, -1 otherwise
    code: int  # exit status; 0 = clean stop
