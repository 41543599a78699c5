"""Kernels: paged attention against dense attention per job; block copy within and across pools."""

import math
import random

import pytest
import torch

from kernels.block_copy import copy_blocks
from kernels.paged_attention import build_meta, paged_attention, store_kv

LAYERS, BS, KVH, HEADS, DIM = 2, 4, 2, 6, 8


def dense(q, k, v, context):
    """q [Q, H, D] against k, v [N, KVH, D] where query i sits at position context + i."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,nhd->hqn", q, k) / math.sqrt(q.shape[-1])
    pos = torch.arange(k.shape[0])
    allowed = pos[None, :] <= (torch.arange(q.shape[0])[:, None] + context)
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    return torch.einsum("hqn,nhd->qhd", scores.softmax(-1), v).reshape(q.shape[0], -1)


def test_paged_attention_matches_dense_for_mixed_jobs():
    g = torch.Generator().manual_seed(0)
    query_lens, context_lens = [1, 7, 1, 3, 5], [9, 0, 0, 6, 0]
    pool = torch.zeros(40, LAYERS, 2, KVH, BS, DIM)
    free = random.Random(1).sample(range(40), 40)
    tables = [[free.pop() for _ in range(-(-(q + c) // BS))] for q, c in zip(query_lens, context_lens)]
    history = []  # per job, the full K/V sequence (context then new) of layer 1
    for c, table in zip(context_lens, tables):  # fill each job's cached context directly
        k, v = torch.randn(c, KVH, DIM, generator=g), torch.randn(c, KVH, DIM, generator=g)
        for t in range(c):
            pool[table[t // BS], 1, 0, :, t % BS], pool[table[t // BS], 1, 1, :, t % BS] = k[t], v[t]
        history.append((k, v))
    total = sum(query_lens)
    q = torch.randn(total, HEADS, DIM, generator=g)
    k, v = torch.randn(total, KVH, DIM, generator=g), torch.randn(total, KVH, DIM, generator=g)
    meta = build_meta(query_lens, context_lens, tables, BS, LAYERS, KVH, torch.device("cpu"))
    assert meta.positions.tolist() == [9, *range(7), 0, 6, 7, 8, *range(5)]
    store_kv(pool, 1, k, v, meta)
    out = paged_attention(pool, 1, q, k, v, meta, DIM ** -0.5)
    start = 0
    for j, (qn, c) in enumerate(zip(query_lens, context_lens)):
        kj = torch.cat([history[j][0], k[start:start + qn]])
        vj = torch.cat([history[j][1], v[start:start + qn]])
        ref = dense(q[start:start + qn], kj, vj, c)
        torch.testing.assert_close(out[start:start + qn], ref, rtol=1e-5, atol=1e-5)
        start += qn
    assert pool[:, 0].abs().sum() == 0  # layer 0 untouched


def _pools():
    src = torch.arange(10 * 3 * 2, dtype=torch.float32).view(10, 3, 2)
    return src, torch.zeros(6, 3, 2)


def test_copy_blocks_between_pools_runs_and_scattered():
    src, dst = _pools()
    copy_blocks(src, dst, [2, 3, 4, 8], [0, 1, 2, 5])
    assert torch.equal(dst[[0, 1, 2, 5]], src[[2, 3, 4, 8]])
    assert dst[3].abs().sum() == 0 and dst[4].abs().sum() == 0
    ids = list(range(10))
    random.Random(0).shuffle(ids)
    back = torch.zeros_like(src)
    copy_blocks(src, back, ids, ids[::-1])
    assert torch.equal(back[ids[::-1]], src[ids])


def test_copy_blocks_within_one_pool_with_overlap():
    src, _ = _pools()
    before = src.clone()
    copy_blocks(src, src, [0, 1, 2, 3], [2, 3, 4, 5])
    assert torch.equal(src[2:6], before[0:4]) and torch.equal(src[:2], before[:2])


def test_copy_blocks_rejects_bad_input():
    src, dst = _pools()
    with pytest.raises(ValueError, match="out of range"):
        copy_blocks(src, dst, [0], [6])
    with pytest.raises(ValueError, match="ids"):
        copy_blocks(src, dst, [0, 1], [0])
    with pytest.raises(ValueError, match="shapes differ"):
        copy_blocks(src, torch.zeros(4, 3, 3), [0], [0])
    copy_blocks(src, dst, [], [])  # nothing to do is fine


def test_equal_length_decodes_take_the_unmasked_path_and_match_dense():
    g = torch.Generator().manual_seed(5)
    pool = torch.randn(12, LAYERS, 2, KVH, BS, DIM, generator=g)
    tables = [[3, 7], [11, 0]]
    meta = build_meta([1, 1], [5, 5], tables, BS, LAYERS, KVH, torch.device("cpu"))
    assert meta.decode_mask == 6
    q = torch.randn(2, HEADS, DIM, generator=g)
    k, v = torch.randn(2, KVH, DIM, generator=g), torch.randn(2, KVH, DIM, generator=g)
    store_kv(pool, 0, k, v, meta)
    out = paged_attention(pool, 0, q, k, v, meta, DIM ** -0.5)
    for j, table in enumerate(tables):
        ks = torch.stack([pool[table[t // BS], 0, 0, :, t % BS] for t in range(6)])
        vs = torch.stack([pool[table[t // BS], 0, 1, :, t % BS] for t in range(6)])
        torch.testing.assert_close(out[j:j + 1], dense(q[j:j + 1], ks, vs, 5), rtol=1e-5, atol=1e-5)
