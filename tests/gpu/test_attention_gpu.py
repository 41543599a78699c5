"""On CUDA: FlashInfer's paged kernels equal the torch reference over the same pool, where FlashInfer is importable."""

import dataclasses
import random

import pytest
import torch

from common.model.spec import tiny_spec
from kernels.attention import FlashInferAttention, ReferenceAttention, flashinfer_unfit, make_attention
from kernels.paged_attention import build_meta, store_kv
from workers.model.batch import StepInput
from workers.model.runner import StageRunner
from workers.model.weights import random_weights

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
LAYERS, BS, KVH, HEADS, DIM = 2, 16, 2, 8, 64


@pytest.fixture
def flashinfer_fits():
    why = flashinfer_unfit(CUDA, DIM, torch.bfloat16)
    if why:
        pytest.skip(f"optional: {why}")


def test_auto_picks_flashinfer_where_it_fits_and_the_reference_for_fp32(flashinfer_fits):
    assert make_attention("auto", CUDA, HEADS, KVH, DIM, BS, torch.bfloat16)[0].name == "flashinfer"
    backend, why = make_attention("auto", CUDA, HEADS, KVH, DIM, BS, torch.float32)
    assert backend.name == "reference" and "float16 or bfloat16" in why


def test_flashinfer_equals_the_reference_on_a_mixed_step(flashinfer_fits):
    g = torch.Generator(device="cpu").manual_seed(0)
    query_lens, context_lens = [1, 7, 1, 3, 16, 1], [9, 0, 40, 6, 20, 0]
    free = random.Random(1).sample(range(64), 64)
    tables = [[free.pop() for _ in range(-(-(q + c) // BS))] for q, c in zip(query_lens, context_lens)]
    pool = torch.randn(64, LAYERS, 2, KVH, BS, DIM, generator=g).to(CUDA, torch.bfloat16)
    t = sum(query_lens)
    q = torch.randn(t, HEADS, DIM, generator=g).to(CUDA, torch.bfloat16)
    k = torch.randn(t, KVH, DIM, generator=g).to(CUDA, torch.bfloat16)
    v = torch.randn(t, KVH, DIM, generator=g).to(CUDA, torch.bfloat16)
    meta = build_meta(query_lens, context_lens, tables, BS, LAYERS, KVH, CUDA)
    store_kv(pool, 1, k, v, meta)
    ref = ReferenceAttention(DIM ** -0.5)
    fi = FlashInferAttention(CUDA, HEADS, KVH, DIM, BS, torch.bfloat16, DIM ** -0.5)
    ref.plan(meta)
    fi.plan(meta)
    want = ref.attend(pool, 1, q, k, v, meta).float()
    got = fi.attend(pool, 1, q, k, v, meta).float()
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


def test_a_stage_on_flashinfer_follows_the_reference(flashinfer_fits):
    spec = dataclasses.replace(tiny_spec(), head_dim=DIM)
    weights = random_weights(spec, 0)
    runs = {}
    for backend in ("reference", "flashinfer"):
        runner = StageRunner(spec, weights, 0, spec.num_layers, 16, BS, "cuda", "bfloat16", backend)
        assert runner.attention.name == backend
        prompt = torch.arange(40, 73)
        out = runner.forward(StepInput([0], [33], [0], [[3, 1, 7]], token_ids=prompt))
        nxt = runner.forward(StepInput([0], [1], [33], [[3, 1, 7]], token_ids=out.argmax(-1)))
        runs[backend] = torch.cat([out, nxt]).float()
    a, b = runs["reference"], runs["flashinfer"]
    assert ((a - b).abs().max() / a.abs().max()) < 0.05
    assert a.argmax(-1).tolist() == b.argmax(-1).tolist()
