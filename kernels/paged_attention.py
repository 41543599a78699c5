"""Paged attention, torch reference: write new K/V into pool slots and attend over each job's block table.

Pool layout: [num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim] (common/model/layout.py).
A "chunk" is the [block_size, head_dim] slab of one (block, layer, K|V, kv head); gathering a job's
chunks in table order yields its K as [kv_heads, tokens, head_dim], already contiguous in the layout
attention wants, so the gather is the only copy. All addressing is precomputed once per step
(AttnMeta) as flat chunk/row indices, packed into one buffer that goes to the device in one non-blocking
copy; each layer adds its own offset. No Python loop over tokens.
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
    chunks: torch.Tensor | None  # [kv_heads, blocks] K chunks of layer 0; None when context_len == 0


@dataclass(frozen=True)
class AttnMeta:
    positions: torch.Tensor  # [T] int64, position of each new token in its job
    rows: torch.Tensor  # [T * kv_heads] int64, pool row (of layer 0's K) of each new token and kv head
    layer_chunks: int  # chunks between one layer's K and the next layer's K
    v_chunks: int  # chunks between a K chunk and its V chunk
    block_size: int  # rows per chunk
    decode_rows: torch.Tensor | None  # [D] rows of the step holding single-token (decode) jobs
    decode_chunks: torch.Tensor | None  # [D, kv_heads, blocks] K chunks of layer 0 (padded with chunk 0)
    decode_mask: torch.Tensor | int | None  # [D, 1, 1, blocks * block_size] bool, True where attended;
    # an int when every decode job attends the same number of tokens (then K/V are sliced, no mask)
    prefills: tuple[PrefillSpan, ...]  # jobs with more than one new token, attended one by one
    last_rows: torch.Tensor  # [num_jobs] int64, row of each job's last new token (the one the last stage samples)
    token_ids: torch.Tensor | None  # [T] int64 on the device, when the step's tokens were packed along
    buffer: torch.Tensor  # the one int64 device buffer every tensor above is a view of (the mask is computed from it)
    query_lens: tuple[int, ...]  # the step's shape on the host, for backends that plan on the host
    context_lens: tuple[int, ...]
    block_tables: tuple[tuple[int, ...], ...]


def pack(parts: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Every int64 part in one host buffer (page-locked for CUDA) sent with one non-blocking copy; views by name.

    One pinned copy instead of a pageable blocking copy per tensor: the host queues the step and goes on,
    and the caching host allocator keeps the buffer until the copy has read it.
    """
    flat = [(t if t.dtype == torch.long else t.long()).reshape(-1) for t in parts.values()]
    sizes = [t.numel() for t in flat]
    host = torch.empty(sum(sizes), dtype=torch.long, pin_memory=device.type == "cuda")
    torch.cat(flat, out=host)
    buffer = host.to(device, non_blocking=True)
    views = {name: v.view(t.shape) for (name, t), v in zip(parts.items(), buffer.split(sizes))}
    return buffer, views


def build_meta(query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
               block_size: int, num_layers: int, num_kv_heads: int, device: torch.device,
               token_ids: torch.Tensor | None = None) -> AttnMeta:
    """Addressing for one step; the pool holds num_layers layers per block. token_ids [T] ride along if given."""
    device = torch.device(device)
    n = len(query_lens)
    width = max(len(t) for t in block_tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.long)
    qlens = torch.tensor(query_lens, dtype=torch.long)
    ctx = torch.tensor(context_lens, dtype=torch.long)
    block_chunks = num_layers * 2 * num_kv_heads  # chunks per block
    heads = torch.arange(num_kv_heads)
    job = torch.repeat_interleave(torch.arange(n), qlens)
    starts = torch.cumsum(qlens, 0) - qlens
    pos = torch.arange(int(qlens.sum())) - starts[job] + ctx[job]
    chunk = table[job, pos // block_size][:, None] * block_chunks + heads[None, :]
    rows = (chunk * block_size + (pos % block_size)[:, None]).reshape(-1)
    parts = {"positions": pos, "rows": rows, "last_rows": starts + qlens - 1}
    if token_ids is not None:
        parts["token_ids"] = token_ids

    def chunks_of(tables: torch.Tensor) -> torch.Tensor:  # [..., blocks] -> [..., kv_heads, blocks]
        return tables.unsqueeze(-2) * block_chunks + heads[:, None]

    decode = [i for i in range(n) if query_lens[i] == 1]
    decode_mask, used = None, 0
    if decode:
        d = torch.tensor(decode, dtype=torch.long)
        total = ctx[d] + 1
        used = int(-(-total.max() // block_size))
        parts["decode_chunks"] = chunks_of(table[d, :used])
        parts["decode_rows"] = starts[d]
        if bool((total == total[0]).all()):  # equal lengths (the benchmark case): slice instead of masking
            decode_mask = int(total[0])
        else:
            parts["decode_lens"] = total
    spans = []
    for i in range(n):
        if query_lens[i] == 1:
            continue
        c, q = context_lens[i], query_lens[i]
        if c:
            parts[f"prefill{i}"] = chunks_of(table[i, :-(-(c + q) // block_size)])
        spans.append((i, int(starts[i]), q, c))
    buffer, dev = pack(parts, device)
    if "decode_lens" in dev:  # built on the device from the lengths: no mask crosses the bus
        keys = torch.arange(used * block_size, device=device)
        decode_mask = (keys[None, :] < dev["decode_lens"][:, None])[:, None, None, :]
    prefills = tuple(PrefillSpan(start, q, c, dev.get(f"prefill{i}")) for i, start, q, c in spans)
    return AttnMeta(dev["positions"], dev["rows"], 2 * num_kv_heads, num_kv_heads, block_size,
                    dev.get("decode_rows"), dev.get("decode_chunks"), decode_mask, prefills, dev["last_rows"],
                    dev.get("token_ids"), buffer, tuple(query_lens), tuple(context_lens),
                    tuple(tuple(t) for t in block_tables))


def store_kv(pool: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttnMeta) -> None:
    """Write new K/V [T, kv_heads, head_dim] of one layer (index within the stage) into their slots."""
    rows = pool.view(-1, pool.shape[-1])
    base = meta.rows + layer * meta.layer_chunks * meta.block_size
    rows.index_copy_(0, base, k.reshape(-1, k.shape[-1]))
    rows.index_copy_(0, base + meta.v_chunks * meta.block_size, v.reshape(-1, v.shape[-1]))


def _gather(pool: torch.Tensor, chunks: torch.Tensor, offset: int) -> torch.Tensor:
    """[..., kv_heads, blocks] chunk ids -> [..., kv_heads, blocks * block_size, head_dim]."""
    flat = pool.view(-1, pool.shape[-2], pool.shape[-1])
    got = flat.index_select(0, (chunks + offset).reshape(-1))
    return got.view(*chunks.shape[:-1], chunks.shape[-1] * pool.shape[-2], pool.shape[-1])


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
    off = layer * meta.layer_chunks
    if meta.decode_rows is not None:
        # each kv head's `group` queries act as a short query sequence: GQA without repeating K/V
        qd = q.index_select(0, meta.decode_rows).view(-1, kv_heads, group, dim)
        kc = _gather(pool, meta.decode_chunks, off)
        vc = _gather(pool, meta.decode_chunks, off + meta.v_chunks)
        mask = meta.decode_mask
        if isinstance(mask, int):
            kc, vc, mask = kc[:, :, :mask], vc[:, :, :mask], None
        od = F.scaled_dot_product_attention(qd, kc, vc, attn_mask=mask, scale=scale)
        out.index_copy_(0, meta.decode_rows, od.reshape(-1, heads, dim))
    for p in meta.prefills:
        qp = q[p.start:p.start + p.length].transpose(0, 1)[None]
        if p.chunks is None:
            kp = k[p.start:p.start + p.length].transpose(0, 1)[None]
            vp = v[p.start:p.start + p.length].transpose(0, 1)[None]
            mask, causal = None, True
        else:
            n = p.context_len + p.length
            kp = _gather(pool, p.chunks, off)[None, :, :n]
            vp = _gather(pool, p.chunks, off + meta.v_chunks)[None, :, :n]
            keys = torch.arange(n, device=q.device)
            mask = keys[None, :] <= (torch.arange(p.length, device=q.device)[:, None] + p.context_len)
            causal = False
        op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, is_causal=causal, scale=scale,
                                            enable_gqa=group > 1)
        out[p.start:p.start + p.length] = op[0].transpose(0, 1)
    return out.view(t, heads * dim)
