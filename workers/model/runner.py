"""StageRunner: one pipeline stage's layers, its paged KV pool, and the batched forward of one step."""

from __future__ import annotations

import dataclasses

import torch

from kernels.attention import make_attention
from kernels.paged_attention import build_meta
from workers.model.batch import StepInput
from common.model.layout import block_shape, stage_layers
from workers.model.llama import LlamaStage
from workers.model.opt import OPTStage
from common.model.spec import ModelError, ModelSpec, load_spec
from workers.model.weights import Weights, load_weights, torch_dtype


def cuda_unusable() -> str:
    """Why torch cannot use a GPU here, in one line ("" when it can)."""
    if torch.version.cuda is None:
        return (f"torch {torch.__version__} is a CPU-only build; `make gpu` installs the CUDA build for this "
                "machine's driver")
    if not torch.cuda.is_available():
        return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no usable GPU: no NVIDIA driver, or one "
                f"too old for CUDA {torch.version.cuda} (CUDA 13 needs driver >= 580); `make gpu` picks the torch "
                "build for the driver")
    return ""


def resolve_device(device: str, stage: int, devices: tuple[str, ...] = ()) -> torch.device:
    """"cpu", or the GPU of `stage`: devices[stage] when given, else stage modulo the visible GPUs."""
    if device == "cpu":
        return torch.device("cpu")
    why = cuda_unusable()
    if why:
        raise ModelError(f"model.device is 'cuda' but {why}; or use model.device=cpu")
    count = torch.cuda.device_count()
    index = int(devices[stage]) if devices else stage % count
    if index >= count:
        raise ModelError(f"parallel.devices puts stage {stage} on cuda:{index} but only {count} GPU(s) are visible; "
                         f"use indices below {count}")
    return torch.device("cuda", index)


def with_context_limit(spec: ModelSpec, max_context: int) -> ModelSpec:
    """The spec with a smaller context limit (0 keeps the model's own)."""
    if max_context <= 0:
        return spec
    if max_context > spec.max_context:
        raise ModelError(f"model.max_context {max_context} exceeds the model's limit {spec.max_context}; lower it or use 0")
    return dataclasses.replace(spec, max_context=max_context)


class StageRunner:
    """Layers [lo, hi) of a model with a KV pool [num_blocks, *block_shape]; forward() runs one step."""

    def __init__(self, spec: ModelSpec, weights: Weights, lo: int, hi: int, num_blocks: int, block_size: int,
                 device: str | torch.device = "cpu", dtype: str = "float32", attention: str = "auto") -> None:
        self.spec, self.lo, self.hi = spec, lo, hi
        self.is_first, self.is_last = lo == 0, hi == spec.num_layers
        self.device, self.dtype = torch.device(device), torch_dtype(dtype)
        self.block_size, self.num_blocks = block_size, num_blocks
        shape = block_shape(spec, lo, hi, block_size)
        if num_blocks <= 0:
            raise ModelError(f"num_blocks must be > 0, not {num_blocks}")
        moved: dict[int, torch.Tensor] = {}  # tied embeddings (embed is lm_head) are copied once
        w: Weights = {}
        for name, tensor in weights.items():
            if id(tensor) not in moved:
                moved[id(tensor)] = tensor.to(self.device, self.dtype)
            w[name] = moved[id(tensor)]
        self.attention, self.attention_fallback = make_attention(
            attention, self.device, spec.num_heads, spec.num_kv_heads, spec.head_dim, block_size, self.dtype)
        family = LlamaStage if spec.family == "llama" else OPTStage
        self.model = family(spec, w, lo, hi, self.device, self.attention)
        self.kv = torch.zeros(num_blocks, *shape, dtype=self.dtype, device=self.device)

    @classmethod
    def build(cls, path: str, lo: int = 0, hi: int | None = None, num_blocks: int = 256, block_size: int = 16,
              device: str = "cpu", dtype: str = "float32", seed: int = 0, max_context: int = 0,
              attention: str = "auto") -> "StageRunner":
        """A stage of the model at `path` ("tiny" or a HF directory), loading only its layers' weights."""
        spec = with_context_limit(load_spec(path), max_context)
        hi = spec.num_layers if hi is None else hi
        block_shape(spec, lo, hi, block_size)  # validates the range before reading weights
        return cls(spec, load_weights(path, spec, lo, hi, seed), lo, hi, num_blocks, block_size, device, dtype, attention)

    @classmethod
    def from_config(cls, config, stage: int) -> "StageRunner":
        """Stage `stage` of config.parallel.num_stages, with config.cache.num_gpu_blocks blocks."""
        m, c = config.model, config.cache
        spec = load_spec(m.path)
        ranges = stage_layers(spec.num_layers, config.parallel.num_stages)
        if not 0 <= stage < len(ranges):
            raise ModelError(f"stage {stage} does not exist; parallel.num_stages is {len(ranges)}")
        lo, hi = ranges[stage]
        device = resolve_device(m.device, stage, config.parallel.devices)
        return cls.build(m.path, lo, hi, c.num_gpu_blocks, c.block_size, str(device), m.dtype, m.seed, m.max_context,
                         m.attention)

    @torch.inference_mode()
    def forward(self, step: StepInput) -> torch.Tensor:
        """Hidden [T, hidden] on a non-last stage; logits [num_jobs, vocab] of each job's last new token on the last."""
        step.check(self.block_size, self.num_blocks, self.is_first)
        for q, c in zip(step.query_lens, step.context_lens):
            if q + c > self.spec.max_context:
                raise ModelError(f"{q + c} tokens exceed the model's context of {self.spec.max_context}")
        # one pinned buffer, one non-blocking copy: the step's addressing and (first stage) its tokens
        meta = build_meta(step.query_lens, step.context_lens, step.block_tables, self.block_size,
                          self.hi - self.lo, self.spec.num_kv_heads, self.device,
                          token_ids=step.token_ids if self.is_first else None)
        if self.is_first:
            h = self.model.embed(meta.token_ids, meta.positions)
        else:
            # through page-locked memory: a pageable copy would make the host wait for the whole stream
            h = step.hidden.pin_memory() if self.device.type == "cuda" else step.hidden
            h = h.to(self.device, self.dtype, non_blocking=True)
        self.attention.plan(meta)
        extra = self.model.prepare(meta)
        for i in range(self.lo, self.hi):
            h = self.model.layer(i, h, self.kv, meta, extra)
        if not self.is_last:
            return h
        return self.model.head(h.index_select(0, meta.last_rows))
