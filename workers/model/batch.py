"""StepInput: one flattened iteration of one stage (prefill and decode jobs mixed)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.model.spec import ModelError


@dataclass(frozen=True)
class StepInput:
    job_ids: list[int]
    query_lens: list[int]  # new tokens per job this step: a prefill has many, a decode has 1
    context_lens: list[int]  # tokens already in the KV cache per job = position of its first new token
    block_tables: list[list[int]]  # per job, KV block ids covering context + new tokens
    token_ids: torch.Tensor | None = None  # [T] int64 on the first stage, T = sum(query_lens)
    hidden: torch.Tensor | None = None  # [T, hidden] on later stages

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    def check(self, block_size: int, num_blocks: int, first_stage: bool) -> None:
        """Raise ModelError when the lists disagree or the block tables cannot hold the tokens."""
        n = len(self.job_ids)
        if not (len(self.query_lens) == len(self.context_lens) == len(self.block_tables) == n):
            raise ModelError("job_ids, query_lens, context_lens and block_tables must have one entry per job")
        if n == 0:
            raise ModelError("a step needs at least one job")
        for job, q, c, table in zip(self.job_ids, self.query_lens, self.context_lens, self.block_tables):
            if q <= 0 or c < 0:
                raise ModelError(f"job {job}: query_len must be > 0 and context_len >= 0 (got {q}, {c})")
            if len(table) * block_size < q + c:
                raise ModelError(f"job {job}: {len(table)} blocks of {block_size} cannot hold {q + c} tokens")
            if any(not 0 <= b < num_blocks for b in table):
                raise ModelError(f"job {job}: block table has ids outside [0, {num_blocks})")
        data = self.token_ids if first_stage else self.hidden
        if data is None:
            raise ModelError("the first stage needs token_ids, later stages need hidden")
        if data.shape[0] != self.num_tokens:
            raise ModelError(f"step carries {data.shape[0]} tokens but query_lens sum to {self.num_tokens}")
