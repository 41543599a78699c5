"""Client protocol (client DEALER <-> ingress ROUTER): request and event structs and error codes."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated

from common.codec import MaxLen, OneOf, Range, message
from common.messages import Logprobs, MsgType, TokenLogprobs

PROTOCOL_VERSION = 2  # bumped on any incompatible change; a mismatch is answered with unsupported_version
MAX_REQUEST_ID_LEN = 128  # characters
MAX_PROMPT_CHARS = 1 << 22  # characters of prompt text
MAX_PROMPT_IDS = 1 << 20  # token ids
MAX_STOPS = 16  # stop strings per request
MAX_STOP_CHARS = 256  # characters per stop string (each is held back up to that long while streaming)
DEFAULT_MAX_TOKENS = 256  # max_tokens of a request that leaves it out, capped by the context its prompt leaves
CLIENT_LEASE_S = 10.0  # default: a client with live requests that sends nothing for this long has them cancelled
HEARTBEAT_S = 2.0  # how often the client library sends a Heartbeat while it has live requests


class ErrorCode(StrEnum):
    """The `code` of an ErrorEvent; docs/PROTOCOL.md says when each is sent."""

    INVALID_REQUEST = "invalid_request"  # malformed frames or a field out of range; also a duplicate request id
    CONTEXT_TOO_LONG = "context_too_long"  # prompt tokens + max_tokens exceed the model context
    CANNOT_FIT = "cannot_fit"  # the job could never fit the KV-cache pool
    OVERLOADED = "overloaded"  # the admission bound on jobs in the system is reached; retry later
    UNAVAILABLE = "unavailable"  # the stack is not ready (starting or a process died); retry later
    UNSUPPORTED_VERSION = "unsupported_version"  # the request's version is not PROTOCOL_VERSION
    CANCELLED = "cancelled"  # the client cancelled the request
    INTERNAL = "internal"  # the stack failed while serving the request
    TIMEOUT = "timeout"  # client-side only: no end event within the client's timeout


RequestId = Annotated[str, MaxLen(MAX_REQUEST_ID_LEN)]


@message(MsgType.GENERATE)
@dataclass(frozen=True)
class Generate:
    """Client -> ingress: start a request. Give exactly one of prompt and prompt_ids."""

    version: int  # must equal PROTOCOL_VERSION
    max_tokens: Annotated[int, Range(1)] | None = None  # output tokens at most; None = DEFAULT_MAX_TOKENS or the context left
    request_id: RequestId = ""  # client-chosen, unique among the client's live requests; "" = ingress assigns
    prompt: Annotated[str, MaxLen(MAX_PROMPT_CHARS)] | None = None  # text, tokenized by the ingress
    prompt_ids: Annotated[list[int], MaxLen(MAX_PROMPT_IDS)] | None = None  # token ids, used as given
    temperature: Annotated[float, Range(0.0, 100.0)] = 0.0  # 0 = greedy
    top_k: Annotated[int, Range(0)] = 0  # keep the k most likely tokens; 0 = off
    top_p: Annotated[float, Range(0.0, 1.0)] = 1.0  # nucleus mass, > 0; 1.0 = off
    seed: Annotated[int, Range(0, 2**63 - 1)] | None = None  # sampling seed; None = unseeded
    stop_token_ids: Annotated[list[int], MaxLen(1024)] = field(default_factory=list)  # stop on any of these
    ignore_eos: bool = False  # keep generating past the model's EOS tokens
    stream: bool = True  # true: TokenEvents as tokens arrive; false: one FinishEvent with everything
    stop: Annotated[list[Annotated[str, MaxLen(MAX_STOP_CHARS)]], MaxLen(MAX_STOPS)] = field(default_factory=list)
    # stop strings, matched on the output text: the first one ends the request with "stop" and is never sent
    logprobs: Logprobs = None  # per output token: its logprob and the k most likely alternatives (k <= 5)
    batch_events: bool = False  # true: this request's TokenEvents may arrive inside TokenEvents (type 12)


@message(MsgType.CANCEL)
@dataclass(frozen=True)
class Cancel:
    """Client -> ingress: end a live request; it ends with ErrorEvent code "cancelled"."""

    request_id: RequestId  # the request to cancel; unknown or finished ids are ignored


@message(MsgType.HEARTBEAT)
@dataclass(frozen=True)
class Heartbeat:
    """Client -> ingress: renews the connection's lease; any client message does as much. No reply."""


@message(MsgType.STATS_QUERY)
@dataclass(frozen=True)
class StatsQuery:
    """Client -> ingress: ask for the stack's counters; answered by StatsReply or ErrorEvent."""

    request_id: RequestId  # names the reply


@message(MsgType.TOKEN_EVENT)
@dataclass(frozen=True)
class TokenEvent:
    """Ingress -> client: new output tokens of a streamed request."""

    request_id: str  # the request this belongs to
    token_ids: list[int]  # tokens generated since the last event, in order
    text: str  # text delta: complete characters only; bytes of a split character wait for later tokens
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per token_ids entry when asked, else []


@message(MsgType.TOKEN_EVENTS)
@dataclass(frozen=True)
class TokenEvents:
    """Ingress -> client: TokenEvents of one iteration for the connection's requests that asked for
    batch_events, in one message, in the order they would have been sent one by one."""

    events: list[TokenEvent]


@message(MsgType.FINISH_EVENT)
@dataclass(frozen=True)
class FinishEvent:
    """Ingress -> client: the request ended normally; the last event of the request."""

    request_id: str  # the request this ends
    finish_reason: Annotated[str, OneOf(("stop", "length"))]  # stop token (or EOS) | max_tokens reached
    token_ids: list[int]  # tokens not sent in a TokenEvent (all of them when stream is false)
    text: str  # text not sent in a TokenEvent (all of it when stream is false)
    prompt_tokens: Annotated[int, Range(0)]  # tokens in the prompt
    completion_tokens: Annotated[int, Range(0)]  # tokens generated in all
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per token_ids entry when asked, else []


@message(MsgType.ERROR_EVENT)
@dataclass(frozen=True)
class ErrorEvent:
    """Ingress -> client: the request failed or was cancelled; the last event of the request."""

    request_id: str  # the request this ends; "" when it could not be read from the message
    code: str  # an ErrorCode value
    message: str  # what went wrong, for people


@message(MsgType.STATS_REPLY)
@dataclass(frozen=True)
class StatsReply:
    """Ingress -> client: counters of the ingress and the scheduler (kv_free_blocks, kv_total_blocks, ...)."""

    request_id: str  # the StatsQuery this answers
    values: dict[str, int | float]  # counter name -> value


CLIENT_MESSAGES = (Generate, Cancel, StatsQuery, Heartbeat)
SERVER_EVENTS = (TokenEvent, TokenEvents, FinishEvent, ErrorEvent, StatsReply)
