"""The attention seam and the step's metadata: the reference on CPU, one packed buffer, stage -> GPU mapping."""

import pytest
import torch

from common.model.spec import ModelError, tiny_spec
from kernels.attention import AttentionError, ReferenceAttention, flashinfer_unfit, make_attention
from kernels.paged_attention import build_meta, pack
from workers.model import runner as runner_mod
from workers.model.runner import StageRunner, resolve_device
from workers.model.weights import random_weights

CPU = torch.device("cpu")


def test_the_reference_backend_is_the_one_used_on_cpu():
    runner = StageRunner.build("tiny", num_blocks=8, block_size=16)
    assert runner.attention.name == "reference" and isinstance(runner.attention, ReferenceAttention)
    assert runner.model.attention is runner.attention
    backend, why = make_attention("auto", CPU, 8, 4, 64, 16, torch.bfloat16)
    assert backend.name == "reference" and "CUDA only" in why
    backend, why = make_attention("reference", torch.device("cuda"), 8, 4, 64, 16, torch.bfloat16)
    assert backend.name == "reference" and why == ""


def test_asking_for_flashinfer_where_it_cannot_run_says_what_to_change():
    with pytest.raises(AttentionError, match="model.attention=auto or reference"):
        make_attention("flashinfer", CPU, 8, 4, 64, 16, torch.bfloat16)
    with pytest.raises(AttentionError, match="use auto, reference or flashinfer"):
        make_attention("triton", CPU, 8, 4, 64, 16, torch.bfloat16)


def test_flashinfer_fit_names_the_reason():
    cuda = torch.device("cuda")  # a device object needs no GPU
    assert "float16 or bfloat16" in flashinfer_unfit(cuda, 128, torch.float32)
    assert "head_dim" in flashinfer_unfit(cuda, 32, torch.bfloat16)
    assert "CUDA only" in flashinfer_unfit(CPU, 128, torch.bfloat16)


def _step():
    query_lens, context_lens = [1, 5, 1, 3], [9, 0, 20, 6]
    tables = [[3, 7, 12], [1, 13], [0, 2, 4, 5, 6, 8], [9, 10, 11]]  # blocks of 4 tokens
    return query_lens, context_lens, tables


def test_every_tensor_of_the_step_is_a_view_of_one_buffer():
    query_lens, context_lens, tables = _step()
    tokens = torch.arange(100, 110)
    meta = build_meta(query_lens, context_lens, tables, 4, 2, 2, CPU, token_ids=tokens)
    base, end = meta.buffer.data_ptr(), meta.buffer.data_ptr() + meta.buffer.numel() * 8
    views = [meta.positions, meta.rows, meta.last_rows, meta.token_ids, meta.decode_rows, meta.decode_chunks,
             *(p.chunks for p in meta.prefills if p.chunks is not None)]
    for view in views:
        assert base <= view.data_ptr() < end and view.dtype == torch.long
    decode_lens = len(meta.decode_rows)  # unequal decode lengths travel too: the mask is built from them
    assert meta.buffer.numel() == sum(v.numel() for v in views) + decode_lens  # nothing else rides along


def test_the_packed_buffer_holds_what_build_meta_computes():
    query_lens, context_lens, tables = _step()
    tokens = torch.arange(100, 110)
    meta = build_meta(query_lens, context_lens, tables, 4, 2, 2, CPU, token_ids=tokens)
    assert meta.token_ids.tolist() == tokens.tolist()
    assert meta.positions.tolist() == [9, 0, 1, 2, 3, 4, 20, 6, 7, 8]
    assert meta.last_rows.tolist() == [0, 5, 6, 9]
    assert meta.decode_rows.tolist() == [0, 6]
    # the mask is computed from the packed lengths: job 0 attends 10 tokens, job 2 attends 21 (6 blocks of 4)
    mask = meta.decode_mask[:, 0, 0]
    assert mask.shape == (2, 24) and mask.sum(1).tolist() == [10, 21] and mask[0, :10].all()
    # block 3, layer 0, K, kv head 1 is chunk 3 * (2 layers * 2 * 2 heads) + 1; position 9 is row 1 of block 12
    assert meta.decode_chunks[0, 1, 0].item() == 3 * 8 + 1
    assert meta.rows[:2].tolist() == [(12 * 8 + 0) * 4 + 1, (12 * 8 + 1) * 4 + 1]
    (first, second) = meta.prefills
    assert (first.start, first.length, first.context_len, first.chunks) == (1, 5, 0, None)
    assert second.chunks.tolist() == [[9 * 8, 10 * 8, 11 * 8], [9 * 8 + 1, 10 * 8 + 1, 11 * 8 + 1]]
    assert (meta.query_lens, meta.context_lens) == (tuple(query_lens), tuple(context_lens))


def test_pack_keeps_names_shapes_and_values():
    parts = {"a": torch.arange(6).view(2, 3), "b": torch.tensor([7], dtype=torch.int32), "c": torch.empty(0, 4)}
    buffer, views = pack(parts, CPU)
    assert buffer.tolist() == [0, 1, 2, 3, 4, 5, 7]
    assert views["a"].tolist() == [[0, 1, 2], [3, 4, 5]] and views["b"].tolist() == [7]
    assert views["c"].shape == (0, 4)


def test_tied_embeddings_reach_the_device_once():
    weights = dict(random_weights(tiny_spec(), 0))
    weights["lm_head"] = weights["embed"]
    spec = tiny_spec()
    runner = StageRunner(spec, weights, 0, spec.num_layers, 4, 16, "cpu", "bfloat16")
    assert runner.model.w["lm_head"] is runner.model.w["embed"]
    assert runner.model.w["embed"].dtype == torch.bfloat16


@pytest.fixture
def one_visible_gpu(monkeypatch):
    monkeypatch.setattr(runner_mod.torch.version, "cuda", "13.0")
    monkeypatch.setattr(runner_mod.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(runner_mod.torch.cuda, "device_count", lambda: 1)


def test_every_stage_maps_onto_the_one_visible_gpu(one_visible_gpu):
    assert [resolve_device("cuda", k) for k in range(3)] == [torch.device("cuda", 0)] * 3
    assert resolve_device("cuda", 1, ("0", "0")) == torch.device("cuda", 0)
    assert resolve_device("cpu", 1, ("0", "0")) == CPU
    with pytest.raises(ModelError, match="parallel.devices puts stage 1 on cuda:3"):
        resolve_device("cuda", 1, ("0", "3"))


def test_a_cpu_only_torch_is_named_in_one_line(monkeypatch):
    monkeypatch.setattr(runner_mod.torch.version, "cuda", None)
    with pytest.raises(ModelError, match="CPU-only build") as e:
        resolve_device("cuda", 0)
    assert "\n" not in str(e.value) and "make gpu" in str(e.value)
    monkeypatch.setattr(runner_mod.torch.version, "cuda", "13.0")
    monkeypatch.setattr(runner_mod.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError, match="driver >= 580"):
        resolve_device("cuda", 0)
