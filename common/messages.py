"""Every wire type byte (MsgType) and the internal messages between the processes of the stack."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Annotated

import numpy as np

from common.codec import OneOf, Range, message


class MsgType(IntEnum):
    """The first frame of every message. Values are stable wire constants: add, never renumber."""

    # 1..15: client protocol (common/protocol.py, docs/PROTOCOL.md)
    GENERATE = 1
    CANCEL = 2
    STATS_QUERY = 3
    HEARTBEAT = 4
    TOKEN_EVENT = 8
    FINISH_EVENT = 9
    ERROR_EVENT = 10
    STATS_REPLY = 11
    TOKEN_EVENTS = 12
    # 16..31: ingress <-> scheduler, and process lifecycle
    SUBMIT_JOB = 16
    CANCEL_JOB = 17
    JOB_EVENT = 18
    STATS_REQUEST = 19
    STATS = 20
    READY = 21
    EXIT = 22
    JOB_EVENTS = 23
    ALIVE = 24
    # 32..127: scheduler, KV-cache manager and stage workers
    SCHEDULE_BATCH = 32
    BATCH_PLANNED = 33
    STAGE_BATCH = 34
    BATCH_RESULT = 35
    SWAP_DONE = 36
    KV_CHANGED = 37
    KV_CAPACITY = 38
    SAMPLED_TOKENS = 39


FINISH_REASONS = ("", "stop", "length", "cancelled", "error")  # "" while the job runs

JobId = Annotated[int, Range(0)]  # ingress-assigned, never reused, across ingress restarts too
Epoch = Annotated[int, Range(0)]  # a process's incarnation: microseconds of wall clock when it started
MAX_LOGPROBS = 5  # most likely alternatives a job may ask for at each step
Logprobs = Annotated[int, Range(0, MAX_LOGPROBS)] | None  # None = no logprobs; k = the token's and the k most likely


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities of one generated token under the model's distribution at its step (the last stage's
    logits before temperature, top-k and top-p), natural log; -9999.0 stands for a probability of 0."""

    logprob: float  # of the generated token
    top_ids: list[int]  # the k most likely token ids, most likely first (k as the job asked; may be empty)
    top_logprobs: list[float]  # their log-probabilities, same order


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
    logprobs: Logprobs = None  # per generated token: its logprob and the k most likely alternatives


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
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per token_ids entry if the job asked, else []

    def with_logprobs(self, entry: TokenLogprobs | None) -> "JobEvent":
        """This event carrying the logprobs of its one new token (itself when there are none)."""
        return self if entry is None or len(self.token_ids) != 1 else dataclasses.replace(self, logprobs=[entry])


@message(MsgType.JOB_EVENTS)
@dataclass(frozen=True)
class JobEvents:
    """Scheduler -> ingress: the events of one iteration in one message.

    Plain token rows (new tokens, no end, no logprobs), most of every iteration, travel as columns: no
    struct per job to build or check. Other events (a job's end, tokens with logprobs) follow in
    `events`, and are applied after the columns; a job with one there has no later plain row.
    """

    job_ids: list[int]  # jobs with plain new tokens
    num_tokens: list[int]  # per job, how many of token_ids are its
    token_ids: list[int]  # the new tokens, concatenated in job order
    events: list[JobEvent]  # the rest, in order

    def __post_init__(self) -> None:
        if len(self.num_tokens) != len(self.job_ids) or sum(self.num_tokens) != len(self.token_ids) \
                or any(n < 0 for n in self.num_tokens):
            raise ValueError("num_tokens must give one count >= 0 per job, summing to len(token_ids)")

    @classmethod
    def pack(cls, events: list[JobEvent]) -> "JobEvents":
        job_ids: list[int] = []
        counts: list[int] = []
        tokens: list[int] = []
        rest: list[JobEvent] = []
        special: set[int] = set()  # jobs with an event in `rest`: their later events follow it there
        for ev in events:
            if ev.finish_reason or ev.logprobs or ev.job_id in special:
                rest.append(ev)
                special.add(ev.job_id)
            else:
                job_ids.append(ev.job_id)
                counts.append(len(ev.token_ids))
                tokens += ev.token_ids
        return cls(job_ids, counts, tokens, rest)


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
    epoch: Epoch = 0  # the sender's epoch (common/liveness.py); 0 = not said


@message(MsgType.EXIT)
@dataclass(frozen=True)
class Exit:
    """The launcher says a process of its stack died: the scheduler and ingress fail every live request.

    Honoured only with the launcher's token (`endpoints.control_token`, in the config file the launcher
    wrote for its children): anyone else who can reach an inbox cannot stop the stack with one message.
    Processes run alone have no launcher; their deaths are found by heartbeats (Alive).
    """

    role: str  # as in Ready
    stage: int  # stage index for workers, -1 otherwise
    code: int  # exit status; 0 = clean stop
    token: str = ""  # the launcher's control token


@message(MsgType.ALIVE)
@dataclass(frozen=True)
class Alive:
    """A heartbeat, every `liveness.heartbeat_s`: workers and the KV manager to the scheduler, ingress to
    the scheduler, the scheduler to ingress and the KV manager. A process whose heartbeats stop for
    `liveness.timeout_s` is down; one that comes back with a new epoch restarted, and its peers drop
    whatever they held for its old epoch."""

    role: str  # "ingress" | "scheduler" | "kvcache" | "worker"
    stage: int  # stage index for workers, -1 otherwise
    epoch: Annotated[int, Range(1)]  # the sender's incarnation, larger after every restart
    up: bool = True  # from the scheduler: every process of the stack is heard from and serving
    # from the scheduler: how often the stack went up or down in this epoch. Heartbeats travel on a socket
    # of their own, so one may arrive after a later change; the receiver ignores `up` of a lower count.
    changes: Annotated[int, Range(0)] = 0


# --- scheduler -> KV-cache manager -> stage 0 -> ... -> last stage -> scheduler -------------------------


@dataclass(frozen=True)
class BatchSampling:
    """How the last stage samples each job of a batch: one column entry per job, in batch order."""

    temperature: list[float]  # 0 = greedy
    top_k: list[int]  # 0 = no top-k cut
    top_p: list[float]  # nucleus mass in (0, 1]; 1.0 = no cut
    seed: list[int | None]  # per-job seed; None = unseeded
    step: list[int]  # index of the output token this iteration produces
    logprobs: list[Logprobs] = field(default_factory=list)  # per job, as SubmitJob.logprobs; [] = none asks

    def __post_init__(self) -> None:
        if not self.logprobs and self.temperature:  # a sender that knows no logprobs: none are asked for
            object.__setattr__(self, "logprobs", [None] * len(self.temperature))

    def select(self, rows: list[int]) -> "BatchSampling":
        return BatchSampling(*([column[i] for i in rows] for column in self.columns()))

    def columns(self) -> tuple[list, ...]:
        return (self.temperature, self.top_k, self.top_p, self.seed, self.step, self.logprobs)


def _check_carry(msg: object) -> None:
    carry, n = msg.carry_from, len(msg.job_ids)
    if carry and (len(carry) != n or any(b >= 0 and q != 1 for b, q in zip(carry, msg.num_new_tokens))):
        raise ValueError("carry_from must have one entry per job, and a carried job computes exactly 1 token")


def _check_columns(msg: object, names: tuple[str, ...]) -> None:
    n = len(getattr(msg, names[0]))
    sampling = getattr(msg, "sampling", None)
    lengths = [len(getattr(msg, name)) for name in names] + ([len(c) for c in sampling.columns()] if sampling else [])
    if any(length != n for length in lengths):
        raise ValueError(f"per-job columns differ in length: {dict(zip(names, lengths))}")


@message(MsgType.SCHEDULE_BATCH)
@dataclass(frozen=True)
class ScheduleBatch:
    """Scheduler -> KV-cache manager: the batch the policy picked, plus what the KV manager must know.

    Per-job fields are columns (one entry per job, in priority order): a batch decodes in one pass
    instead of one nested struct per job. A message with no jobs still carries frees and the run
    order (housekeeping when nothing runs).
    """

    batch_id: Annotated[int, Range(0)]  # scheduler-assigned, increasing
    job_ids: list[int]
    num_new_tokens: list[int]  # tokens this iteration computes per job (prompt, 1, or a recompute)
    context_lens: list[int]  # tokens already in the KV cache per job = position of its first new token
    sampling: BatchSampling
    input_ids: np.ndarray  # [sum(num_new_tokens)] int64, the jobs' new tokens concatenated in job order
    freed_job_ids: list[int]  # jobs that ended (finished, cancelled, failed) and are in no batch: free their KV
    run_order: list[int]  # live job ids, soonest expected to run first (drives offload/upload)
    in_flight_job_ids: list[int]  # jobs in batches still in the pipeline: never offloaded or dropped
    # per job: the in-flight batch whose sampled token is this job's input (its input_ids entry is a
    # placeholder that stage 0 fills), -1 = none; [] = no job carries (overlapped scheduling)
    carry_from: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_columns(self, ("job_ids", "num_new_tokens", "context_lens"))
        _check_carry(self)
        if self.input_ids.shape != (sum(self.num_new_tokens),):
            raise ValueError(f"input_ids has shape {self.input_ids.shape}, num_new_tokens sum to {sum(self.num_new_tokens)}")


@message(MsgType.BATCH_PLANNED)
@dataclass(frozen=True)
class BatchPlanned:
    """KV-cache manager -> scheduler: which picked jobs the batch left out, sent before it runs; only when
    it left some out, dropped KV, or the copies in flight changed since the scheduler last heard."""

    batch_id: Annotated[int, Range(0)]
    held_job_ids: list[int]  # not run this iteration (no room, or KV moving); they may be picked again
    dropped_job_ids: list[int]  # KV discarded (recompute mode): the next run redoes prompt + generated tokens
    free_blocks: Annotated[int, Range(0)]  # device blocks free after this plan
    copies_in_flight: Annotated[int, Range(0)]  # swap ops not yet acknowledged by every stage


@dataclass(frozen=True)
class SwapOp:
    """A block copy of one job between the device pool and the host pool of every stage."""

    op_id: Annotated[int, Range(0)]  # KV-manager-assigned; acknowledged by each stage in SwapDone
    job_id: JobId
    direction: Annotated[str, OneOf(("out", "in"))]  # out: device -> host; in: host -> device
    src_blocks: list[int]  # block ids in the source pool
    dst_blocks: list[int]  # block ids in the destination pool, same length


@message(MsgType.STAGE_BATCH)
@dataclass(frozen=True)
class StageBatch:
    """KV-cache manager -> stage 0 -> ... -> last stage: swaps, then the compute of one iteration.

    Swaps ride in the same ordered stream as compute, so every stage sees a swap-out of a job after that
    job's last batch and a swap-in before the batch that needs it. A batch with no jobs carries swaps only.
    """

    batch_id: Annotated[int, Range(0)]
    job_ids: list[int]  # the jobs that run, in order
    num_new_tokens: list[int]  # per job, tokens this iteration computes
    context_lens: list[int]  # per job, tokens already in the KV cache
    block_tables: list[list[int]]  # per job, device block ids covering context + new tokens
    sampling: BatchSampling
    swap_out: list[SwapOp]  # run first, in order
    swap_in: list[SwapOp]  # run after swap_out; compute waits for the uploads of jobs it runs
    input_ids: np.ndarray | None  # [T] int64 on the way to stage 0, else None; T = sum(num_new_tokens)
    hidden: np.ndarray | None  # [T, hidden] activations between stages, else None
    compute_s: Annotated[float, Range(0.0)]  # compute seconds of the stages so far
    flush: bool = False  # finish every copy submitted before this message first (after a stage restart)
    carry_from: list[int] = field(default_factory=list)  # as in ScheduleBatch, for the jobs that run

    def __post_init__(self) -> None:
        _check_columns(self, ("job_ids", "num_new_tokens", "context_lens", "block_tables"))
        _check_carry(self)


@message(MsgType.BATCH_RESULT)
@dataclass(frozen=True)
class BatchResult:
    """Last stage -> scheduler: the sampled tokens of one iteration (empty for a swaps-only batch)."""

    batch_id: Annotated[int, Range(0)]
    job_ids: list[int]  # the jobs that ran, in order
    token_ids: list[int]  # one sampled token per job
    compute_s: Annotated[float, Range(0.0)]  # compute seconds summed over all stages
    error: str  # "" on success; a failure of the stage loop on this batch otherwise (jobs then fail)
    failed_job_ids: list[int] = field(default_factory=list)  # jobs whose sampling failed (token -1): they alone end
    failure: str = ""  # why the failed jobs' sampling failed
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)  # per job (None: not asked); [] = none asked

    def logprobs_of(self, row: int) -> TokenLogprobs | None:
        return self.logprobs[row] if self.logprobs else None


@message(MsgType.SWAP_DONE)
@dataclass(frozen=True)
class SwapDone:
    """Stage worker -> KV-cache manager: these copy ops have completed on this stage."""

    stage: Annotated[int, Range(0)]
    op_ids: list[int]
    copy_s: Annotated[float, Range(0.0)]  # seconds the copies took on this stage
    overlap_s: Annotated[float, Range(0.0)]  # part of copy_s that overlapped compute


@message(MsgType.KV_CHANGED)
@dataclass(frozen=True)
class KVChanged:
    """KV-cache manager -> scheduler: memory changed outside a batch (a copy acked, a stage restarted)."""

    free_blocks: Annotated[int, Range(0)]  # device blocks free now
    copies_in_flight: Annotated[int, Range(0)]  # swap ops not yet acknowledged by every stage
    dropped_job_ids: list[int]  # KV lost (a stage restarted with an empty pool): these jobs recompute


@message(MsgType.KV_CAPACITY)
@dataclass(frozen=True)
class KVCapacity:
    """KV-cache manager -> scheduler, before its Ready: the pools the policy bounds starts by."""

    device_blocks: Annotated[int, Range(1)]  # blocks of the device pool (each stage has as many)
    host_blocks: Annotated[int, Range(0)]  # blocks of the host pool usable for swaps; 0 = none
    block_size: Annotated[int, Range(1)]  # tokens per block
    headroom_blocks: Annotated[int, Range(0)]  # device blocks kept free for growth and arrivals
    epoch: Epoch = 0  # the KV manager's epoch
    scheduler_epoch: Epoch = 0  # the scheduler these books were (re)set for; a scheduler takes only its own


@message(MsgType.SAMPLED_TOKENS)
@dataclass(frozen=True)
class SampledTokens:
    """Last stage -> stage 0 (pipelines of 2+ stages): the tokens one batch sampled, sent for every
    batch the last stage finishes (empty when it failed), so that stage 0 can feed the jobs a later
    batch carries (`carry_from`) without a round trip through the scheduler."""

    batch_id: Annotated[int, Range(0)]
    job_ids: list[int]
    token_ids: list[int]  # one per job; -1 where its sampling failed

    def __post_init__(self) -> None:
        _check_columns(self, ("job_ids", "token_ids"))
