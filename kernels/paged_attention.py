"""Paged attention, torch reference: write new K/V into pool slots and attend over each job's block table.

Pool layout: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim] (see workers/model/layout.py).
Token t of a job sits in block table[t // block_size] at offset t % block_size. All addressing is
precomputed once per step (AttnMeta) as flat row indices into the pool viewed as [rows, kv_heads, head_dim],
so each layer only adds its layer offset: no Python loop over tokens anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PrefillSpan:
    start: int  # first row of the job in the flattened step
    length: int  # new tokens
    context_len: int  # tokens already cached
    slots: torch.Tensor | None  # [context_len + length] K rows of layer 0; None when context_len == 0


@dataclass(frozen=True)
class AttnMeta:
    positions: torch.Tensor  # [T] int64, position of each new token in its job
    slots: torch.Tensor  # [T] int64, K row of layer 0 where each new token's K goes
    layer_stride: int  # rows between one layer's K and the next layer's K
    block_size: int  # rows between a K row and its V row
    decode_rows: torch.Tensor | None  # [D] rows of the step holding single-token (decode) jobs
    decode_slots: torch.Tensor | None  # [D, L] K rows of layer 0 of each decode job's context (padded)
    decode_mask: torch.Tensor | None  # [D, 1, 1, L] bool, True where a position is attended
    prefills: tuple[PrefillSpan, ...]  # jobs with more than one new token, attended one by one


def build_meta(query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
               block_size: int, num_layers: int, device: torch.device) -> AttnMeta:
    """Addressing for one step; the pool has num_layers layers per block."""
    n = len(query_lens)
    width = max(len(t) for t in block_tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.long)
    qlens = torch.tensor(query_lens, dtype=torch.long)
    ctx = torch.tensor(context_lens, dtype=torch.long)
    block_rows = num_layers * 2 * block_size  # rows per block
    job = torch.repeat_interleave(torch.arange(n), qlens)
    starts = torch.cumsum(qlens, 0) - qlens
    pos = torch.arange(int(qlens.sum())) - starts[job] + ctx[job]
    slots = table[job, pos // block_size] * block_rows + pos % block_size

    decode = [i for i in range(n) if query_lens[i] == 1]
    decode_rows = decode_slots = decode_mask = None
    if decode:
        d = torch.tensor(decode, dtype=torch.long)
        total = ctx[d] + 1
        span = torch.arange(int(total.max()))
        mask = span[None, :] < total[:, None]
        at = torch.where(mask, span[None, :], 0)  # padding reads position 0, then is masked out
        decode_slots = (table[d[:, None], at // block_size] * block_rows + at % block_size).to(device)
        decode_rows = starts[d].to(device)
        decode_mask = mask[:, None, None, :].to(device)
    prefills = []
    for i in range(n):
        if query_lens[i] == 1:
            continue
        c, q = context_lens[i], query_lens[i]
        span_slots = None
        if c:
            at = torch.arange(c + q)
            span_slots = (table[i, at // block_size] * block_rows + at % block_size).to(device)
        prefills.append(PrefillSpan(int(starts[i]), q, c, span_slots))
    return AttnMeta(pos.to(device), slots.to(device), 2 * block_size, block_size,
                    decode_rows, decode_slots, decode_mask, tuple(prefills))


def store_kv(pool: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttnMeta) -> None:
    """Write new K/V [T, kv_heads, head_dim] of one layer (index within the stage) into their slots."""
    rows = pool.view(-1, pool.shape[-2], pool.shape[-1])
    base = meta.slots + layer * meta.layer_stride
    rows.index_copy_(0, base, k)
    rows.index_copy_(0, base + meta.block_size, v)


def _gather(rows: torch.Tensor, slots: torch.Tensor, offset: int) -> torch.Tensor:
    return rows.index_select(0, (slots + offset).reshape(-1)).view(*slots.shape, *rows.shape[1:])


def paged_attention(pool: torch.Tensor, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    meta: AttnMeta, scale: float) -> torch.Tensor:
    """Attention of new queries q [T, heads, head_dim] over cached + new K/V; returns [T, heads * head_dim].

    store_kv must have run for this layer first. Decode jobs are attended together, each prefill alone
    (causal among its new tokens, full over its cached context).
    """
    t, heads, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    out = torch.empty(t, heads, dim, dtype=q.dtype, device=q.device)
    rows = pool.view(-1, pool.shape[-2], pool.shape[-1])
    off = layer * meta.layer_stride
    if meta.decode_rows is not None:
        # each kv head's `group` queries act as a short query sequence: GQA without repeating K/V
        qd = q.index_select(0, meta.decode_rows).view(-1, kv_heads, group, dim)
        kc = _gather(rows, meta.decode_slots, off).transpose(1, 2)
        vc = _gather(rows, meta.decode_slots, off + meta.block_size).transpose(1, 2)
        od = F.scaled_dot_product_attention(qd, kc, vc, attn_mask=meta.decode_mask, scale=scale)
        out.index_copy_(0, meta.decode_rows, od.reshape(-1, heads, dim))
    for p in meta.prefills:
        qp = q[p.start:p.start + p.length].transpose(0, 1)[None]
        if p.slots is None:
            kp, vp = k[p.start:p.start + p.length], v[p.start:p.start + p.length]
            mask, causal = None, True
        else:
            kp, vp = _gather(rows, p.slots, off), _gather(rows, p.slots, off + meta.block_size)
            keys = torch.arange(p.context_len + p.length, device=q.device)
            mask = keys[None, :] <= (torch.arange(p.length, device=q.device)[:, None] + p.context_len)
            causal = False
        kp, vp = kp.transpose(0, 1)[None], vp.transpose(0, 1)[None]
        if group > 1:
            kp, vp = kp.repeat_interleave(group, dim=1), vp.repeat_interleave(group, dim=1)
        op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, is_causal=causal, scale=scale)
        out[p.start:p.start + p.length] = op[0].transpose(0, 1)
    return out.view(t, heads * dim)
