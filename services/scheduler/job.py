"""A job as the scheduler and its policies see it: lengths, progress, status and per-policy state."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class JobStatus(IntEnum):
    """Live states first, finished states last, so `status >= FINISHED` means the job is done."""

    WAITING = 0  # queued, never run
    RUNNING = 1  # in the batch of the last iteration it could run in
    PREEMPTED = 2  # has run, then was left out of a batch it could have joined
    FINISHED = 3  # produced its last token (stop token or max_tokens)
    CANCELLED = 4  # the client went away
    FAILED = 5  # rejected or broken; the reason went to the client


@dataclass(eq=False)  # identity equality: jobs live in queues and sets, and fields change
class Job:
    job_id: int
    arrival_s: float  # seconds, scheduler clock
    prompt_len: int  # tokens
    max_tokens: int  # upper bound on output tokens
    num_generated: int = 0  # output tokens sampled so far
    num_computed: int = 0  # tokens whose KV is in the cache (prompt and output)
    oracle_output_len: int | None = None  # true output length; only the simulator knows it
    status: JobStatus = JobStatus.WAITING
    preemptions: int = 0
    first_token_s: float | None = None  # seconds, scheduler clock
    finish_s: float | None = None  # seconds, scheduler clock
    # policy state, owned by the policy that holds the job
    level: int = 0  # MLFQ queue index, 0 = highest priority
    attained_s: float = 0.0  # service attained in the current queue, seconds
    service_s: float = 0.0  # service attained in total, seconds
    last_run_s: float | None = None  # end of the last iteration the job ran in; None = never ran

    def __post_init__(self) -> None:
        if self.prompt_len <= 0:
            raise ValueError(f"job {self.job_id}: prompt_len must be > 0, got {self.prompt_len}")
        if self.max_tokens <= 0:
            raise ValueError(f"job {self.job_id}: max_tokens must be > 0, got {self.max_tokens}")
        if self.oracle_output_len is not None and not 0 < self.oracle_output_len <= self.max_tokens:
            raise ValueError(f"job {self.job_id}: oracle_output_len must be in 1..max_tokens, got {self.oracle_output_len}")

    @property
    def context_len(self) -> int:
        """Tokens in the context after the next iteration's input: prompt plus generated output."""
        return self.prompt_len + self.num_generated

    @property
    def num_new_tokens(self) -> int:
        """Tokens the next iteration processes: the prompt first, 1 in decode, more after a recompute drop."""
        return self.context_len - self.num_computed

    @property
    def is_prefill(self) -> bool:
        """True when the next iteration computes KV for more than the last sampled token."""
        return self.num_generated == 0 or self.num_new_tokens > 1

    @property
    def is_finished(self) -> bool:
        return self.status >= JobStatus.FINISHED

    @property
    def expected_output_len(self) -> int:
        """The true output length where known (simulator), else the max_tokens bound."""
        return self.oracle_output_len if self.oracle_output_len is not None else self.max_tokens

    @property
    def remaining_tokens(self) -> int:
        return max(self.expected_output_len - self.num_generated, 0)
