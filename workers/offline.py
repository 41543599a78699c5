"""In-process engine: all stages in sequence, continuous batching over the paged KV (the reference path)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from workers.model.batch import StepInput
from common.model.layout import blocks_needed, stage_layers
from workers.model.runner import StageRunner, resolve_device, with_context_limit
from workers.model.sampling import SamplingParams, finish_reason, sample
from common.model.spec import ModelError, load_spec
from workers.model.weights import load_weights


@dataclass
class _Job:
    index: int
    tokens: list[int]  # prompt then output
    prompt_len: int
    params: SamplingParams
    blocks: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose K/V are in the pool

    @property
    def output(self) -> list[int]:
        return self.tokens[self.prompt_len:]


class OfflineEngine:
    """Runs jobs to completion with iteration-level batching: new jobs join between iterations."""

    def __init__(self, runners: list[StageRunner], max_jobs: int = 32, max_prefill_tokens: int = 2048) -> None:
        if not runners or not runners[0].is_first or not runners[-1].is_last:
            raise ModelError("an engine needs stages covering the model from its first to its last layer")
        self.runners, self.spec = runners, runners[0].spec
        self.max_jobs, self.max_prefill_tokens = max_jobs, max_prefill_tokens
        self.block_size, self.num_blocks = runners[0].block_size, runners[0].num_blocks

    @classmethod
    def build(cls, path: str = "tiny", num_stages: int = 1, num_blocks: int = 512, block_size: int = 16,
              device: str = "cpu", dtype: str = "float32", seed: int = 0, max_context: int = 0,
              max_jobs: int = 32, max_prefill_tokens: int = 2048) -> "OfflineEngine":
        spec = with_context_limit(load_spec(path), max_context)
        runners = []
        for k, (lo, hi) in enumerate(stage_layers(spec.num_layers, num_stages)):
            dev = str(resolve_device(device, k))
            weights = load_weights(path, spec, lo, hi, seed)
            runners.append(StageRunner(spec, weights, lo, hi, num_blocks, block_size, dev, dtype))
        return cls(runners, max_jobs, max_prefill_tokens)

    @classmethod
    def from_config(cls, config) -> "OfflineEngine":
        m, c, s = config.model, config.cache, config.scheduler
        return cls.build(m.path, config.parallel.num_stages, c.num_gpu_blocks, c.block_size, m.device, m.dtype,
                         m.seed, m.max_context, s.max_jobs, s.max_prefill_tokens)

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise ModelError saying what is wrong with one request."""
        if not prompt:
            raise ModelError("the prompt is empty; give at least one token")
        bad = [t for t in prompt if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise ModelError(f"token id {bad[0]} is outside the vocabulary [0, {self.spec.vocab_size})")
        total = len(prompt) + params.max_tokens
        if total > self.spec.max_context:
            raise ModelError(f"prompt ({len(prompt)}) plus max_tokens ({params.max_tokens}) is {total} tokens, "
                             f"over the context length {self.spec.max_context}")
        if blocks_needed(total, self.block_size) > self.num_blocks:
            raise ModelError(f"{total} tokens need more than the {self.num_blocks} KV blocks of "
                             f"{self.block_size} tokens; raise cache.num_gpu_blocks")

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
        """Output token ids per prompt (stop and eos tokens included, as emitted)."""
        if len(prompts) != len(params):
            raise ModelError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        for prompt, p in zip(prompts, params):
            self.check(prompt, p)
        waiting = deque(_Job(i, list(map(int, pr)), len(pr), p) for i, (pr, p) in enumerate(zip(prompts, params)))
        free = list(range(self.num_blocks))[::-1]
        running: list[_Job] = []
        results: list[list[int]] = [[] for _ in prompts]
        while waiting or running:
            self._admit(waiting, running, free)
            tokens = self.step(running)
            done = []
            for job, token in zip(running, tokens):
                job.tokens.append(token)
                if finish_reason(job.params, token, len(job.output), self.spec.eos_token_ids):
                    done.append(job)
            for job in done:
                running.remove(job)
                free.extend(job.blocks)
                results[job.index] = job.output
        return results

    def _admit(self, waiting: deque, running: list[_Job], free: list[int]) -> None:
        budget = self.max_prefill_tokens
        while waiting and len(running) < self.max_jobs:
            job = waiting[0]
            need = blocks_needed(len(job.tokens) + job.params.max_tokens, self.block_size)
            fits = need <= len(free) and (job.prompt_len <= budget or budget == self.max_prefill_tokens)
            if not fits and running:
                return
            if need > len(free):  # nothing running holds blocks: this cannot happen after check()
                raise ModelError("KV pool exhausted with no running jobs")
            waiting.popleft()
            # a job reserves its whole budget up front, so a running job never waits for memory
            job.blocks = [free.pop() for _ in range(need)]
            budget -= job.prompt_len
            running.append(job)

    def step(self, jobs: list[_Job]) -> list[int]:
        """One iteration over all stages for these jobs; returns one sampled token each."""
        query = [len(j.tokens) - j.cached for j in jobs]
        ids = torch.tensor([t for j in jobs for t in j.tokens[j.cached:]], dtype=torch.long)
        base = dict(job_ids=[j.index for j in jobs], query_lens=query, context_lens=[j.cached for j in jobs],
                    block_tables=[j.blocks for j in jobs])
        out = self.runners[0].forward(StepInput(**base, token_ids=ids))
        for runner in self.runners[1:]:
            out = runner.forward(StepInput(**base, hidden=out))
        for j, q in zip(jobs, query):
            j.cached += q
        return sample(out, [j.params for j in jobs], [len(j.output) for j in jobs])


def generate_reference(model_path: str, prompt_ids: list[int], max_tokens: int, seed: int = 0) -> list[int]:
    """Greedy continuation of one prompt on one CPU stage (float32): the reference for serving tests."""
    blocks = blocks_needed(len(prompt_ids) + max_tokens, 16)
    engine = OfflineEngine.build(model_path, num_blocks=max(blocks, 1), block_size=16, seed=seed)
    return engine.generate([list(prompt_ids)], [SamplingParams(max_tokens=max_tokens)])[0]
