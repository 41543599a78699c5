"""Stage slicing, paging, mixed batches and the swap path give exactly what one job gets alone."""

import random

import torch

from kernels.block_copy import copy_blocks
from workers.model.batch import StepInput
from common.model.layout import block_shape, blocks_needed, stage_layers
from workers.model.runner import StageRunner
from common.model.spec import tiny_spec
from workers.model.weights import load_weights

BS = 4  # small blocks so short prompts span several


def runner(lo=0, hi=None, blocks=64) -> StageRunner:
    return StageRunner.build("tiny", lo, hi, num_blocks=blocks, block_size=BS)


def greedy(r: StageRunner, prompt: list[int], steps: int, table: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    ids, ctx, tokens, logits = prompt, 0, [], []
    for _ in range(steps):
        out = r.forward(StepInput([0], [len(ids)], [ctx], [table], token_ids=torch.tensor(ids)))
        ctx += len(ids)
        logits.append(out[0])
        tokens.append(int(out[0].argmax()))
        ids = [tokens[-1]]
    return tokens, logits


PROMPT = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]


def test_stage_layers_are_balanced_and_cover_all_layers():
    assert stage_layers(4, 1) == [(0, 4)]
    assert stage_layers(4, 2) == [(0, 2), (2, 4)]
    assert stage_layers(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert block_shape(tiny_spec(), 1, 3, 16) == (2, 2, 4, 16, 32)
    assert blocks_needed(17, 16) == 2 and blocks_needed(16, 16) == 1


def test_two_stages_in_sequence_equal_the_whole_model():
    spec = tiny_spec()
    whole = runner()
    first, second = runner(0, 1), runner(1, spec.num_layers)
    assert first.is_first and not first.is_last and second.is_last and not second.is_first
    assert "lm_head" not in first.model.w and "embed" not in second.model.w
    table = list(range(8))
    ids, ctx = PROMPT, 0
    for _ in range(6):
        step = dict(job_ids=[0], query_lens=[len(ids)], context_lens=[ctx], block_tables=[table])
        ref = whole.forward(StepInput(**step, token_ids=torch.tensor(ids)))
        hidden = first.forward(StepInput(**step, token_ids=torch.tensor(ids)))
        assert hidden.shape == (len(ids), spec.hidden_size)
        out = second.forward(StepInput(**step, hidden=hidden))
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
        ctx += len(ids)
        ids = [int(ref[0].argmax())]


def test_shuffled_block_table_equals_contiguous():
    contiguous = list(range(10))
    shuffled = random.Random(3).sample(range(64), 10)
    t1, l1 = greedy(runner(), PROMPT, 20, contiguous)
    t2, l2 = greedy(runner(), PROMPT, 20, shuffled)
    assert t1 == t2
    for a, b in zip(l1, l2):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_mixed_prefill_and_decode_batch_equals_each_job_alone():
    prompts = [PROMPT, [5, 9, 200], list(range(30, 53)), [7]]
    steps = 6
    alone = [greedy(runner(), p, steps, list(range(20)))[1] for p in prompts]
    r = runner(blocks=128)
    tables = [list(range(32 * j, 32 * j + 20)) for j in range(len(prompts))]
    # jobs start at different iterations so every step mixes prefills with decodes of other lengths
    start = [0, 1, 1, 3]
    ctx, nxt, seen = [0] * 4, [list(p) for p in prompts], [[] for _ in prompts]
    for it in range(start[-1] + steps):
        jobs = [j for j in range(4) if start[j] <= it < start[j] + steps]
        ids = [t for j in jobs for t in nxt[j]]
        out = r.forward(StepInput(jobs, [len(nxt[j]) for j in jobs], [ctx[j] for j in jobs],
                                  [tables[j] for j in jobs], token_ids=torch.tensor(ids)))
        assert out.shape == (len(jobs), tiny_spec().vocab_size)
        for row, j in enumerate(jobs):
            ctx[j] += len(nxt[j])
            seen[j].append(out[row])
            nxt[j] = [int(out[row].argmax())]
    for j in range(4):
        for a, b in zip(seen[j], alone[j]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_swap_out_to_host_and_back_into_other_blocks_continues_identically():
    ref_tokens, _ = greedy(runner(), PROMPT, 16, list(range(8)))
    r = runner()
    table = [3, 9, 4, 20, 21, 22, 40, 41]
    ids, ctx, tokens = PROMPT, 0, []
    host = torch.zeros(16, *r.kv.shape[1:])
    for i in range(16):
        if i == 8:  # preempt: out to host, scribble over the freed blocks, back into different blocks
            used = table[:blocks_needed(ctx, BS)]
            copy_blocks(r.kv, host, used, list(range(len(used))))
            r.kv[used] = torch.randn_like(r.kv[used])
            table = [30 + 3 * k for k in range(8)]
            copy_blocks(host, r.kv, list(range(len(used))), table[:len(used)])
        out = r.forward(StepInput([0], [len(ids)], [ctx], [table], token_ids=torch.tensor(ids)))
        ctx += len(ids)
        tokens.append(int(out[0].argmax()))
        ids = [tokens[-1]]
    assert tokens == ref_tokens


def test_default_weights_are_seeded_and_separate_greedy_logits():
    spec = tiny_spec()
    a, b = load_weights("tiny", spec, 0, 4, seed=0), load_weights("tiny", spec, 0, 4, seed=1)
    assert torch.equal(a["embed"], load_weights("tiny", spec, 0, 4, seed=0)["embed"])
    assert not torch.equal(a["embed"], b["embed"])
    _, logits = greedy(runner(), PROMPT, 40, list(range(16)))
    gaps = [float(x.topk(2).values[0] - x.topk(2).values[1]) for x in logits]
    assert min(gaps) > 1e-3
