"""The ingress state machine (pure): client requests and scheduler events in, messages to send out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.codec import DecodeError, peek
from common.liveness import Peers
from common.messages import Alive, CancelJob, Exit, JobEvent, JobEvents, Ready, Stats, StatsRequest, SubmitJob, TokenLogprobs
from common.protocol import (
    PROTOCOL_VERSION,
    Cancel,
    ErrorCode,
    ErrorEvent,
    FinishEvent,
    Generate,
    Heartbeat,
    StatsQuery,
    StatsReply,
    TokenEvent,
)
from services.ingress.detok import Detokenizer, detokenizer
from common.stops import StopMatcher
from services.ingress.validate import Limits, Rejected, Tokenizer, check, output_limit, prompt_ids


@dataclass(frozen=True)
class ToClient:
    identity: bytes  # ROUTER routing id of the client
    msg: Any  # a client event
    batch: bool = False  # a TokenEvent that may travel in the client's TokenEvents (Generate.batch_events)


@dataclass(frozen=True)
class ToScheduler:
    msg: Any  # SubmitJob | CancelJob | StatsRequest


@dataclass
class _Request:
    identity: bytes
    request_id: str
    stream: bool
    batch: bool  # its TokenEvents may go in TokenEvents (Generate.batch_events)
    prompt_tokens: int
    kv_blocks: int  # its KV at its worst (prompt + max_tokens), held against the admission budget
    detok: Detokenizer | None
    stops: StopMatcher | None  # None: the request has no stop strings
    token_ids: list[int] = field(default_factory=list)  # generated, not yet sent to the client
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # of token_ids, when the request asked
    completion_tokens: int = 0
    text: str = ""  # decoded, past the stop strings, not yet sent to the client
    cancelled: bool = False  # the client has its final event (cancel or stop string); the scheduler's is awaited


_ERROR_CODES = {c.value for c in ErrorCode}
SCHEDULER = ("scheduler", -1)


class IngressCore:
    """Validates and admits requests, tracks every job until the scheduler ends it, builds the events.

    A job counts against the admission bound from SubmitJob until the scheduler's final JobEvent, even
    after a cancel has been answered, so the bound is on work the stack really holds. Before the
    scheduler announces Ready("stack"), while its heartbeat says the stack is down or has stopped coming,
    and after the launcher reports an Exit, requests get `unavailable`.
    """

    def __init__(self, limits: Limits, tokenizer: Tokenizer | None, first_job_id: int = 1,
                 liveness_timeout_s: float = 3.0, control_token: str = "") -> None:
        self.limits = limits
        self.tokenizer = tokenizer
        self.control_token = control_token  # an Exit counts only with it (the launcher's)
        self.scheduler = Peers(liveness_timeout_s, {SCHEDULER})
        self.ready = False
        self.jobs: dict[int, _Request] = {}  # job_id -> request, until the scheduler's final event
        self.live: dict[tuple[bytes, str], int] = {}  # (client, request_id) -> job_id, until the client's last event
        self.pending_stats: dict[int, tuple[bytes, str]] = {}  # request_no -> (client, request_id)
        self.kv_reserved = 0  # KV blocks the jobs in the system may need, summed
        self._next_job = max(first_job_id, 1)  # the epoch: a restarted ingress never reuses a job id
        self._next_stats = 1
        self.counters = {"requests_accepted": 0, "requests_rejected": 0, "requests_finished": 0}

    # --- from clients -------------------------------------------------------------------------
    def on_client(self, identity: bytes, msg: Any, frames: list | None = None) -> list[Any]:
        """React to one client message (or the DecodeError its frames produced)."""
        if isinstance(msg, DecodeError):
            return [self._reject(identity, self._peek_id(frames), *self._decode_failure(msg, frames))]
        if isinstance(msg, Generate):
            return self._generate(identity, msg)
        if isinstance(msg, Cancel):
            return self._cancel(identity, msg.request_id)
        if isinstance(msg, StatsQuery):
            return self._stats_query(identity, msg.request_id)
        if isinstance(msg, Heartbeat):
            return []  # it renewed the lease (the shell's), nothing more
        return [self._reject(identity, "", ErrorCode.INVALID_REQUEST, f"{type(msg).__name__} is not a request")]

    def _generate(self, identity: bytes, req: Generate) -> list[Any]:
        if req.version != PROTOCOL_VERSION:
            return [self._reject(identity, req.request_id, *_version_error(req.version))]
        request_id = req.request_id or self._server_id(identity)
        if (identity, request_id) in self.live:
            # Named "" (as an unreadable request is): an error under the live request's id would be a
            # second final event for it, and the client would end the wrong request.
            return [self._reject(identity, "", ErrorCode.INVALID_REQUEST,
                                 f"request id {request_id!r} is already live on this connection")]
        try:
            ids = prompt_ids(req, self.tokenizer, self.limits)
            max_tokens = output_limit(req, len(ids), self.limits)
            check(req, len(ids), max_tokens, self.limits)
            if req.stop and self.tokenizer is None:
                raise Rejected(ErrorCode.INVALID_REQUEST, "this model has no tokenizer: stop strings cannot be matched")
            kv_blocks = self.limits.kv_blocks(len(ids) + max_tokens)
            self._admit(kv_blocks)
        except Rejected as e:
            return [self._reject(identity, request_id, e.code, e.message)]
        job_id = self._next_job
        self._next_job += 1
        detok = detokenizer(self.tokenizer)
        stops = StopMatcher(req.stop) if req.stop else None
        self.jobs[job_id] = _Request(identity, request_id, req.stream, req.batch_events, len(ids), kv_blocks, detok, stops)
        self.kv_reserved += kv_blocks
        self.live[(identity, request_id)] = job_id
        self.counters["requests_accepted"] += 1
        submit = SubmitJob(
            job_id=job_id, prompt_ids=ids, max_tokens=max_tokens, temperature=req.temperature,
            top_k=req.top_k, top_p=req.top_p, seed=req.seed, stop_token_ids=list(req.stop_token_ids),
            ignore_eos=req.ignore_eos, logprobs=req.logprobs,
        )
        return [ToScheduler(submit)]

    def _admit(self, kv_blocks: int) -> None:
        if not self.ready:
            raise Rejected(ErrorCode.UNAVAILABLE, "the stack is not ready (starting, or a process stopped); retry later")
        if len(self.jobs) >= self.limits.max_jobs_in_system:
            raise Rejected(ErrorCode.OVERLOADED,
                           f"{len(self.jobs)} jobs are in the system, the bound is {self.limits.max_jobs_in_system}; "
                           "retry later")
        if self.jobs and self.kv_reserved + kv_blocks > self.limits.kv_budget:
            # (an empty system admits any job that fits the device pool: check() has seen to that)
            raise Rejected(ErrorCode.OVERLOADED,
                           f"the jobs in the system may need {self.kv_reserved} KV blocks and this one {kv_blocks}; "
                           f"the stack holds {self.limits.kv_budget}; retry later")

    def _server_id(self, identity: bytes) -> str:
        """An id for a request that came without one, never one a request of this client holds."""
        n = self._next_job
        while (identity, f"ingress-{n}") in self.live:
            n += 1
        return f"ingress-{n}"

    def _cancel(self, identity: bytes, request_id: str) -> list[Any]:
        job_id = self.live.pop((identity, request_id), None)
        if job_id is None:
            return []  # finished already, or never existed: cancelling is idempotent
        self.jobs[job_id].cancelled = True
        return [ToClient(identity, ErrorEvent(request_id, ErrorCode.CANCELLED, "cancelled by the client")),
                ToScheduler(CancelJob(job_id))]

    def drop_client(self, identity: bytes, why: str) -> list[Any]:
        """A client went away or stopped reading: cancel every live request of it, each with its final event."""
        out: list[Any] = []
        for (client, request_id), job_id in list(self.live.items()):
            if client == identity:
                del self.live[(client, request_id)]
                self.jobs[job_id].cancelled = True
                out += [ToClient(identity, ErrorEvent(request_id, ErrorCode.CANCELLED, why)), ToScheduler(CancelJob(job_id))]
        return out

    def has_live(self, identity: bytes) -> bool:
        """Whether this client has a request that has not had its final event."""
        return any(client == identity for client, _ in self.live)

    def _stats_query(self, identity: bytes, request_id: str) -> list[Any]:
        if not self.ready:
            return [self._reject(identity, request_id, ErrorCode.UNAVAILABLE, "the stack is not ready; retry later")]
        request_no = self._next_stats
        self._next_stats += 1
        self.pending_stats[request_no] = (identity, request_id)
        return [ToScheduler(StatsRequest(request_no))]

    def stats_timeout(self, request_no: int) -> list[Any]:
        """The scheduler did not answer a StatsRequest in time."""
        who = self.pending_stats.pop(request_no, None)
        if who is None:
            return []
        return [ToClient(who[0], ErrorEvent(who[1], ErrorCode.UNAVAILABLE, "the scheduler did not answer in time"))]

    # --- from the stack -----------------------------------------------------------------------
    def on_event(self, msg: Any) -> list[Any]:
        """React to one message from the scheduler (or any process announcing Ready/Exit)."""
        if isinstance(msg, JobEvent):
            return self._job_event(msg)
        if isinstance(msg, JobEvents):
            return self.on_job_events(msg)
        if isinstance(msg, Stats):
            return self._stats(msg)
        if isinstance(msg, Ready):
            if msg.role == "stack":
                if msg.epoch and msg.epoch < self.scheduler.epoch(SCHEDULER):
                    return []  # an earlier scheduler's word
                self.ready = True
            return []
        if isinstance(msg, Exit):
            if not self.from_launcher(msg):
                return []  # forged, or sent to a process run alone (the shell logs it)
            return self.fail_all(f"{msg.role} (stage {msg.stage}) exited with code {msg.code}")
        return []

    def from_launcher(self, msg: Exit) -> bool:
        """Whether an Exit carries this stack's launcher's token (run alone there is none to carry)."""
        return bool(self.control_token) and msg.token == self.control_token

    def on_alive(self, msg: Alive, now: float) -> list[Any]:
        """The scheduler's heartbeat: whether the stack is up. A new scheduler epoch means the old one's
        jobs are gone; a stack that went down has ended them (the scheduler's own events say why)."""
        if (msg.role, msg.stage) != SCHEDULER:
            return []
        heard = self.scheduler.heard(msg, now)
        if heard == "stale":
            return []
        up = self.scheduler.up(SCHEDULER)
        out: list[Any] = []
        if heard == "restarted":
            out = self.fail_all("the scheduler restarted; the request was lost with it", ErrorCode.UNAVAILABLE)
        elif self.ready and not up:
            out = self.fail_all("a process of the stack stopped; retry later", ErrorCode.UNAVAILABLE)
        self.ready = up
        return out

    def expire(self, now: float) -> list[Any]:
        """The scheduler's heartbeats stopped for the timeout: every live request ends, new ones wait."""
        if not self.scheduler.expire(now):
            return []
        why = f"the scheduler stopped answering (no heartbeat for {self.scheduler.timeout_s:g} s); retry later"
        return self.fail_all(why, ErrorCode.UNAVAILABLE)

    def on_job_events(self, msg: JobEvents) -> list[Any]:
        """One iteration's events: the plain token rows (columns), then the rest."""
        out: list[Any] = []
        jobs, tokens, offset = self.jobs, msg.token_ids, 0
        for job_id, n in zip(msg.job_ids, msg.num_tokens):
            req = jobs.get(job_id)
            if req is not None and not req.cancelled:
                out += self._running(req, job_id, tokens[offset : offset + n], [])
            offset += n
        for ev in msg.events:
            out += self._job_event(ev)
        return out

    def _job_event(self, ev: JobEvent) -> list[Any]:
        req = self.jobs.get(ev.job_id)
        if req is None:
            return []  # a job this ingress does not know (failed already): nothing to tell anyone
        if not ev.finish_reason:
            return [] if req.cancelled else self._running(req, ev.job_id, ev.token_ids, ev.logprobs)
        del self.jobs[ev.job_id]
        self.kv_reserved -= req.kv_blocks
        if req.cancelled:
            return []
        ended = ev.finish_reason in ("stop", "length")
        self._take(req, ev.token_ids, ev.logprobs, ended)
        if req.stops is not None and req.stops.stopped:
            return self._finish(req, "stop")
        if ended:
            return self._finish(req, ev.finish_reason)
        self.live.pop((req.identity, req.request_id), None)
        self.counters["requests_finished"] += 1
        if ev.finish_reason == "cancelled":
            return [ToClient(req.identity, ErrorEvent(req.request_id, ErrorCode.CANCELLED, "cancelled by the stack"))]
        code = ev.error_code if ev.error_code in _ERROR_CODES else ErrorCode.INTERNAL
        return [ToClient(req.identity, ErrorEvent(req.request_id, code, ev.error_message or "the job failed"))]

    def _running(self, req: _Request, job_id: int, token_ids: list[int], logprobs: list[TokenLogprobs]) -> list[Any]:
        """New tokens of a job that goes on: streamed, or kept for its FinishEvent."""
        self._take(req, token_ids, logprobs, False)
        if req.stops is not None and req.stops.stopped:  # a stop string: the job's further tokens are not wanted
            return self._finish(req, "stop") + [ToScheduler(CancelJob(job_id))]
        return self._stream_out(req) if req.stream else []

    @staticmethod
    def _take(req: _Request, token_ids: list[int], logprobs: list[TokenLogprobs], ended: bool) -> None:
        """Add a job event's tokens and their text; the text stops before the first stop string."""
        req.token_ids.extend(token_ids)
        req.logprobs.extend(logprobs)
        req.completion_tokens += len(token_ids)
        if req.detok is None:
            return
        text = req.detok.add(token_ids) if token_ids else ""
        if ended:
            text += req.detok.flush()
        if req.stops is not None:
            text = req.stops.feed(text) + (req.stops.flush() if ended else "")
        req.text += text

    def _finish(self, req: _Request, reason: str) -> list[Any]:
        """The request's FinishEvent; the job stays counted until the scheduler's final event."""
        req.cancelled = True
        self.live.pop((req.identity, req.request_id), None)
        self.counters["requests_finished"] += 1
        finish = FinishEvent(req.request_id, reason, req.token_ids, req.text, req.prompt_tokens, req.completion_tokens,
                             req.logprobs)
        return [ToClient(req.identity, finish)]

    def _stream_out(self, req: _Request) -> list[Any]:
        if not req.token_ids:
            return []
        event = TokenEvent(req.request_id, req.token_ids, req.text, req.logprobs)
        req.token_ids, req.text, req.logprobs = [], "", []
        return [ToClient(req.identity, event, req.batch)]

    def _stats(self, msg: Stats) -> list[Any]:
        who = self.pending_stats.pop(msg.request_no, None)
        if who is None:
            return []
        values = dict(msg.values)
        values.update({f"ingress_{k}": v for k, v in self.counters.items()})
        values["ingress_jobs_in_system"] = len(self.jobs)
        values["ingress_max_jobs_in_system"] = self.limits.max_jobs_in_system
        values["ingress_kv_reserved_blocks"] = self.kv_reserved
        values["ingress_kv_budget_blocks"] = min(self.limits.kv_budget, 1 << 53)
        return [ToClient(who[0], StatsReply(who[1], values))]

    def fail_all(self, why: str, code: ErrorCode = ErrorCode.INTERNAL) -> list[Any]:
        """The stack broke: end every live request with an error and refuse new ones until it is up again."""
        self.ready = False
        out = [ToClient(r.identity, ErrorEvent(r.request_id, code, why))
               for r in self.jobs.values() if not r.cancelled]
        out += [ToClient(i, ErrorEvent(rid, ErrorCode.UNAVAILABLE, why)) for i, rid in self.pending_stats.values()]
        self.jobs.clear()
        self.kv_reserved = 0
        self.live.clear()
        self.pending_stats.clear()
        return out

    # --- helpers ------------------------------------------------------------------------------
    def _reject(self, identity: bytes, request_id: str, code: ErrorCode, message: str) -> ToClient:
        self.counters["requests_rejected"] += 1
        return ToClient(identity, ErrorEvent(request_id, code, message))

    @staticmethod
    def _peek_id(frames: list | None) -> str:
        value = peek(frames, "request_id") if frames is not None else None
        return value if isinstance(value, str) and len(value) <= 128 else ""

    @staticmethod
    def _decode_failure(err: DecodeError, frames: list | None) -> tuple[ErrorCode, str]:
        version = peek(frames, "version") if frames is not None else None
        if type(version) is int and version != PROTOCOL_VERSION:
            return _version_error(version)
        return ErrorCode.INVALID_REQUEST, err.message


def _version_error(version: int) -> tuple[ErrorCode, str]:
    return ErrorCode.UNSUPPORTED_VERSION, f"protocol version {version} is not supported; this server speaks {PROTOCOL_VERSION}"
