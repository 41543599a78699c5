"""The attention backend seam: the torch reference everywhere, FlashInfer's paged kernels on CUDA.

Both read and write the same pool ([num_blocks, layers, 2, kv_heads, block_size, head_dim]): one layer's
slice is FlashInfer's HND paged layout with 16-token pages, so a backend changes no KV byte and the copy
executor, the planner and the swaps are the same whichever runs. A step is planned once (plan) and
attended per layer (attend); store_kv runs first in both.
"""

from __future__ import annotations

from typing import Protocol

import torch

from kernels.paged_attention import AttnMeta, paged_attention

FLASHINFER_HEAD_DIMS = (64, 128, 256)  # head sizes FlashInfer's prefill kernels are built for
FLASHINFER_DTYPES = (torch.float16, torch.bfloat16)
WORKSPACE_BYTES = 128 << 20  # FlashInfer's float workspace, as its examples size it


class AttentionError(RuntimeError):
    """The configured backend cannot run here; the message says what to change."""


class AttentionBackend(Protocol):
    name: str

    def plan(self, meta: AttnMeta) -> None:
        """Prepare the step described by meta (once, before the first layer)."""

    def attend(self, pool: torch.Tensor, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               meta: AttnMeta) -> torch.Tensor:
        """Attention of q [T, heads, head_dim] over the layer's cached + new K/V; returns [T, heads * head_dim]."""


class ReferenceAttention:
    """kernels/paged_attention.py: gather each job's blocks, then torch's SDPA. Runs on every device."""

    name = "reference"

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def plan(self, meta: AttnMeta) -> None:
        return None

    def attend(self, pool, layer, q, k, v, meta):
        return paged_attention(pool, layer, q, k, v, meta, self.scale)


class FlashInferAttention:
    """FlashInfer's batch prefill/append kernel over the paged pool: prefills and decodes in one launch per layer."""

    name = "flashinfer"

    def __init__(self, device: torch.device, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, scale: float) -> None:
        import flashinfer  # lazily: only CUDA stages that chose it need it

        self.device, self.dtype, self.scale = device, dtype, scale
        self.num_heads, self.num_kv_heads, self.head_dim, self.block_size = num_heads, num_kv_heads, head_dim, block_size
        self._workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self._wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self._workspace, "HND")
        self._warm_up()

    def _warm_up(self) -> None:
        """Run one tiny step now: FlashInfer compiles its kernels on first use, and a compile that fails
        must fail here, at start, not in the first batch."""
        from kernels.paged_attention import build_meta

        pool = torch.zeros(2, 1, 2, self.num_kv_heads, self.block_size, self.head_dim, dtype=self.dtype,
                           device=self.device)
        meta = build_meta([2, 1], [0, 3], [[0], [1]], self.block_size, 1, self.num_kv_heads, self.device)
        q = torch.zeros(3, self.num_heads, self.head_dim, dtype=self.dtype, device=self.device)
        self.plan(meta)
        self.attend(pool, 0, q, None, None, meta)
        torch.cuda.synchronize(self.device)

    def plan(self, meta: AttnMeta) -> None:
        bs = self.block_size
        kv_lens = [q + c for q, c in zip(meta.query_lens, meta.context_lens)]
        pages = [-(-n // bs) for n in kv_lens]
        indices = [b for table, n in zip(meta.block_tables, pages) for b in table[:n]]
        as_int32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
        qo_indptr = as_int32([0, *torch.tensor(meta.query_lens).cumsum(0).tolist()])
        kv_indptr = as_int32([0, *torch.tensor(pages).cumsum(0).tolist()])
        last_page = as_int32([(n - 1) % bs + 1 for n in kv_lens])
        # causal is aligned to the end of each job's keys: new token i sees its context and new tokens <= i
        self._wrapper.plan(qo_indptr, kv_indptr, as_int32(indices).to(self.device, non_blocking=True), last_page,
                           self.num_heads, self.num_kv_heads, self.head_dim, bs, causal=True, sm_scale=self.scale,
                           q_data_type=self.dtype, kv_data_type=self.dtype)

    def attend(self, pool, layer, q, k, v, meta):
        cache = (pool[:, layer, 0], pool[:, layer, 1])  # [blocks, kv_heads, block_size, head_dim] each, HND
        return self._wrapper.run(q.contiguous(), cache).reshape(q.shape[0], -1)


def flashinfer_unfit(device: torch.device, head_dim: int, dtype: torch.dtype) -> str:
    """Why FlashInfer cannot serve this stage ("" when it can)."""
    if device.type != "cuda":
        return "FlashInfer runs on CUDA only"
    if dtype not in FLASHINFER_DTYPES:
        return f"FlashInfer needs float16 or bfloat16, not {str(dtype).removeprefix('torch.')}"
    if head_dim not in FLASHINFER_HEAD_DIMS:
        return f"FlashInfer is built for head_dim {FLASHINFER_HEAD_DIMS}, not {head_dim}"
    try:
        import flashinfer  # noqa: F401
    except ImportError as e:
        return f"flashinfer is not importable ({e}); `make gpu` installs flashinfer-python"
    return ""


def make_attention(choice: str, device: torch.device, num_heads: int, num_kv_heads: int, head_dim: int,
                   block_size: int, dtype: torch.dtype) -> tuple[AttentionBackend, str]:
    """The backend model.attention asks for, and why the reference runs instead ("" when it is the choice).

    "reference" and CPU devices get the torch reference; "auto" takes FlashInfer where it fits and falls
    back to the reference; "flashinfer" where it does not fit is an error that says why.
    """
    scale = head_dim ** -0.5
    if choice not in ("auto", "reference", "flashinfer"):
        raise AttentionError(f"model.attention is {choice!r}; use auto, reference or flashinfer")
    if choice == "reference":
        return ReferenceAttention(scale), ""
    why = flashinfer_unfit(device, head_dim, dtype)
    if why and choice == "flashinfer":
        raise AttentionError(f"model.attention=flashinfer cannot run: {why}; use model.attention=auto or reference")
    if why:
        return ReferenceAttention(scale), why
    try:
        return FlashInferAttention(device, num_heads, num_kv_heads, head_dim, block_size, dtype, scale), ""
    except Exception as e:  # a kernel that does not build or run here (no nvcc, an unsupported GPU): say so
        why = f"FlashInfer failed its warm-up step: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if choice == "flashinfer":
            raise AttentionError(f"model.attention=flashinfer cannot run: {why}; use model.attention=reference") from e
        return ReferenceAttention(scale), why
