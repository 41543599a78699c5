"""`fastserve profile`: time prefill (batch 1, by input length) and decode (by batch and context), write JSON."""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from common import affinity
from common.config import ConfigError, load, worker_threads
from common.profile import Profile
from workers.generate import _Parser, _UsageError
from workers.model.batch import StepInput
from common.model.layout import blocks_needed
from workers.model.runner import with_context_limit
from common.model.spec import ModelError, load_spec
from workers.offline import OfflineEngine


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastserve profile", description="measure iteration times for skip-join and the simulator")
    p.add_argument("--model", help="'smollm2-135m' (default), 'tiny' or a Hugging Face checkpoint directory (overrides the config)")
    p.add_argument("--config", help="TOML config file (model, cache.block_size, parallel.num_stages)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--input-lens", default="16,32,64,128,256,512", help="prefill lengths, tokens")
    p.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    p.add_argument("--context-lens", default="64,256,1024", help="decode context lengths, tokens")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point (the median is kept)")
    return p


def _sizes(text: str, what: str, limit: int) -> list[int]:
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ModelError(f"--{what} must be comma-separated integers, not {text!r}") from None
    values = [v for v in values if 0 < v <= limit]
    if not values:
        raise ModelError(f"--{what} has no value in [1, {limit}]")
    return values


def _sync(engine: OfflineEngine) -> None:
    for r in engine.runners:
        if r.device.type == "cuda":
            torch.cuda.synchronize(r.device)


def time_step(engine: OfflineEngine, query_lens: list[int], context_lens: list[int], repeats: int) -> float:
    """Median seconds of one iteration over all stages (KV contents do not change the time)."""
    bs = engine.block_size
    tables, next_block = [], 0
    for q, c in zip(query_lens, context_lens):
        n = blocks_needed(q + c, bs)
        tables.append(list(range(next_block, next_block + n)))
        next_block += n
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, engine.spec.vocab_size, (sum(query_lens),), generator=g)
    base = dict(job_ids=list(range(len(query_lens))), query_lens=query_lens, context_lens=context_lens,
                block_tables=tables)

    def run() -> float:
        _sync(engine)
        t0 = time.perf_counter()
        out = engine.runners[0].forward(StepInput(**base, token_ids=ids))
        for r in engine.runners[1:]:
            out = r.forward(StepInput(**base, hidden=out))
        _sync(engine)
        return time.perf_counter() - t0

    run()  # warm-up of this shape
    return statistics.median(run() for _ in range(repeats))


def profile(engine: OfflineEngine, input_lens: list[int], batches: list[int], contexts: list[int],
            repeats: int, meta: dict) -> Profile:
    prefill = [time_step(engine, [n], [0], repeats) for n in input_lens]
    decode = [tuple(time_step(engine, [1] * b, [c] * b, repeats) for c in contexts) for b in batches]
    return Profile(tuple(input_lens), tuple(prefill), tuple(batches), tuple(contexts), tuple(decode), meta)


def run(argv: list[str]) -> Profile:
    args = parser().parse_args(argv)
    config = load(args.config, list(args.set) + ([f"model.path={args.model}"] if args.model else []))
    if args.repeats < 1:
        raise ModelError("--repeats must be >= 1")
    spec = with_context_limit(load_spec(config.model.path), config.model.max_context)
    limit = spec.max_context - 1  # a decode step reads context + 1 tokens
    inputs = _sizes(args.input_lens, "input-lens", spec.max_context)
    batches = _sizes(args.batch_sizes, "batch-sizes", 1 << 16)
    contexts = _sizes(args.context_lens, "context-lens", limit)
    bs = config.cache.block_size
    blocks = max(blocks_needed(max(inputs), bs), max(batches) * blocks_needed(max(contexts) + 1, bs))
    m = config.model
    if m.device == "cpu":  # time the step on the cores and threads a stage worker gets (workers/service.py)
        affinity.pin(config.parallel, "worker", 0)
        torch.set_num_threads(worker_threads(config.parallel))
    engine = OfflineEngine.build(m.path, config.parallel.num_stages, blocks, bs, m.device, m.dtype, m.seed,
                                 m.max_context)
    meta = {"model": m.path, "device": m.device, "dtype": m.dtype, "num_stages": config.parallel.num_stages,
            "block_size": bs}
    prof = profile(engine, inputs, batches, contexts, args.repeats, meta)
    prof.save(args.out)
    return prof


def main(argv: list[str]) -> int:
    try:
        prof = run(argv)
    except (_UsageError, ModelError, ConfigError, ValueError, OSError) as e:
        print(f"fastserve profile: error: {e}", file=sys.stderr)
        return 2
    print(f"prefill {prof.prefill_time(prof.prefill_len[0]) * 1e3:.2f}..{prof.prefill_s[-1] * 1e3:.2f} ms "
          f"for {prof.prefill_len[0]}..{prof.prefill_len[-1]} tokens; decode {prof.decode_s[0][0] * 1e3:.2f}.."
          f"{prof.decode_s[-1][-1] * 1e3:.2f} ms", file=sys.stderr)
    return 0
