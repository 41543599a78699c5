"""Iteration-time cost models for the simulator: a measured profile, or an analytic roofline.

A cost model answers, for one batch, the time of one iteration through the whole model (all
pipeline stages in sequence); the simulator splits it evenly over the stages. It also gives the
batch-1 prefill time (for skip-join), the KV capacity and the host-device swap time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol, Sequence

from common.profile import Profile

GIB = 2**30


class CostModel(Protocol):
    num_stages: int
    kv_capacity_tokens: int  # KV tokens that fit in device memory, all stages together; 0 = unknown

    def iteration_time(self, prefill_lens: Sequence[int], decode_contexts: Sequence[int]) -> float: ...

    def prefill_time(self, input_len: int) -> float: ...

    def swap_time(self, num_tokens: int) -> float: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class GPU:
    name: str
    flops: float  # dense fp16/bf16 tensor FLOP/s
    hbm_bytes_s: float  # device memory bandwidth, bytes/s
    memory_bytes: float  # device memory, bytes
    link_bytes_s: float  # NVLink bandwidth per GPU, one direction, bytes/s (tensor parallel)
    net_bytes_s: float  # inter-node bandwidth per GPU, bytes/s (pipeline sends)
    host_bytes_s: float  # host<->device copy bandwidth per GPU, bytes/s (KV swaps)


@dataclass(frozen=True)
class Model:
    name: str
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    ffn: int  # MLP inner size
    vocab: int
    gated_mlp: bool  # SwiGLU (3 matrices) or GELU MLP (2)
    bytes_per_param: int = 2  # fp16/bf16 weights and KV

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.num_heads * self.num_kv_heads

    @property
    def layer_params(self) -> int:
        attention = self.hidden * (self.hidden + 2 * self.kv_dim) + self.hidden * self.hidden
        return attention + (3 if self.gated_mlp else 2) * self.hidden * self.ffn

    @property
    def params(self) -> int:
        return self.num_layers * self.layer_params + 2 * self.vocab * self.hidden  # embedding + LM head

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.kv_dim * self.bytes_per_param


GPUS = {
    # A100 SXM 40 GB: 312 TFLOP/s fp16, 1555 GB/s HBM2, NVLink3 300 GB/s per direction,
    # one 200 Gb/s HDR InfiniBand NIC per GPU, PCIe 4.0 x16 host link (~25 GB/s in practice)
    "A100-40GB": GPU("A100-40GB", 312e12, 1555e9, 40 * GIB, 300e9, 25e9, 25e9),
    # H100 SXM 80 GB: 989 TFLOP/s dense bf16, 3.35 TB/s HBM3, NVLink4 450 GB/s per direction,
    # 400 Gb/s NDR per GPU, PCIe 5.0 x16 (~50 GB/s in practice)
    "H100-80GB": GPU("H100-80GB", 989e12, 3350e9, 80 * GIB, 450e9, 50e9, 50e9),
}

MODELS = {
    "gpt3-175b": Model("gpt3-175b", 96, 12288, 96, 96, 4 * 12288, 50257, gated_mlp=False),
    "opt-13b": Model("opt-13b", 40, 5120, 40, 40, 4 * 5120, 50272, gated_mlp=False),
    "llama3-8b": Model("llama3-8b", 32, 4096, 32, 8, 14336, 128256, gated_mlp=True),
}


@dataclass(frozen=True)
class Roofline:
    """Each stage's time is max(FLOPs / achieved FLOP/s, bytes / achieved bandwidth) per GPU, plus
    tensor-parallel all-reduces (two per layer, ring), the activation send to the next stage, and a
    fixed per-stage overhead (kernel launches, sampling). Stages hold equal numbers of layers."""

    gpu: GPU
    model: Model
    tp: int = 1  # tensor-parallel degree inside a stage
    pp: int = 1  # pipeline stages
    compute_efficiency: float = 0.5  # achieved / peak FLOP/s for GEMMs
    memory_efficiency: float = 0.8  # achieved / peak HBM bandwidth
    allreduce_latency_s: float = 10e-6  # per all-reduce
    stage_overhead_s: float = 0.5e-3  # per stage and iteration
    memory_utilization: float = 0.9  # share of device memory for weights + KV
    activation_reserve_bytes: float = 2 * GIB  # per GPU, for activations and workspace

    def __post_init__(self) -> None:
        if self.tp <= 0 or self.pp <= 0:
            raise ValueError(f"tensor and pipeline degrees must be > 0, got tp={self.tp}, pp={self.pp}")
        if self.model.num_layers % self.pp:
            raise ValueError(f"{self.model.name} has {self.model.num_layers} layers, not divisible into {self.pp} stages")
        if self.kv_capacity_tokens <= 0:
            raise ValueError(
                f"{self.model.name} does not fit on {self.tp * self.pp} x {self.gpu.name}: "
                f"{self.weight_bytes_per_gpu / GIB:.1f} GiB of weights per GPU; raise tp or pp"
            )

    @property
    def num_stages(self) -> int:
        return self.pp

    @property
    def weight_bytes_per_gpu(self) -> float:
        return self.model.params * self.model.bytes_per_param / (self.tp * self.pp)

    @property
    def kv_capacity_tokens(self) -> int:
        free = self.gpu.memory_bytes * self.memory_utilization - self.weight_bytes_per_gpu - self.activation_reserve_bytes
        per_token = self.model.kv_bytes_per_token / (self.tp * self.pp)
        return max(int(free // per_token), 0)

    def stage_time(self, prefill_lens: Sequence[int], decode_contexts: Sequence[int]) -> float:
        m, g, tp = self.model, self.gpu, self.tp
        layers = m.num_layers // self.pp
        tokens = sum(prefill_lens) + len(decode_contexts)
        if tokens == 0:
            return 0.0
        attn_tokens2 = sum(n * n for n in prefill_lens)  # causal prefill: n^2/2 pairs, 2 GEMMs, 2 FLOPs
        attn_ctx = sum(decode_contexts)
        flops = layers * (2 * m.layer_params * tokens + 2 * m.hidden * attn_tokens2 + 4 * m.hidden * attn_ctx)
        flops += 2 * m.vocab * m.hidden * (len(prefill_lens) + len(decode_contexts)) / self.pp  # LM head, spread
        kv_layer_token = 2 * m.kv_dim * m.bytes_per_param
        bytes_ = layers * (m.layer_params * m.bytes_per_param + kv_layer_token * (attn_ctx + tokens))
        t = max(flops / tp / (g.flops * self.compute_efficiency), bytes_ / tp / (g.hbm_bytes_s * self.memory_efficiency))
        if tp > 1:
            ar_bytes = tokens * m.hidden * m.bytes_per_param
            t += layers * 2 * (2 * (tp - 1) / tp * ar_bytes / g.link_bytes_s + self.allreduce_latency_s)
        if self.pp > 1:
            t += tokens * m.hidden * m.bytes_per_param / tp / g.net_bytes_s
        return t + self.stage_overhead_s

    def iteration_time(self, prefill_lens: Sequence[int], decode_contexts: Sequence[int]) -> float:
        return self.pp * self.stage_time(prefill_lens, decode_contexts)

    def prefill_time(self, input_len: int) -> float:
        return self.iteration_time([input_len], [])

    def swap_time(self, num_tokens: int) -> float:
        """One-way copy of num_tokens tokens' KV; every GPU moves its own slice in parallel."""
        return num_tokens * self.model.kv_bytes_per_token / (self.tp * self.pp) / self.gpu.host_bytes_s

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "roofline",
            "gpu": asdict(self.gpu),
            "model": {**asdict(self.model), "params": self.model.params},
            "tp": self.tp,
            "pp": self.pp,
            "num_gpus": self.tp * self.pp,
            "kv_capacity_tokens": self.kv_capacity_tokens,
            "decode_iteration_s_batch1_ctx512": self.iteration_time([], [512]),
            "prefill_s_512": self.prefill_time(512),
            **{k: getattr(self, k) for k in ("compute_efficiency", "memory_efficiency", "stage_overhead_s", "memory_utilization")},
        }


def roofline(gpu: str, model: str, tp: int = 1, pp: int = 1) -> Roofline:
    """A roofline for preset names (see GPUS and MODELS)."""
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; presets: {', '.join(GPUS)}")
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; presets: {', '.join(MODELS)}")
    return Roofline(GPUS[gpu], MODELS[model], tp, pp)


@dataclass(frozen=True)
class ProfileCost:
    """Iteration times from a `fastserve profile` file (whole-model times, split evenly over stages),
    plus the stack's own per-iteration cost where the profile has it for this stage count."""

    profile: Profile
    num_stages: int = 1
    kv_capacity_tokens: int = 0  # 0 = unknown: the simulator then models unlimited KV
    kv_bytes_per_token: float = 0.0
    host_bytes_s: float = 10e9

    def iteration_time(self, prefill_lens: Sequence[int], decode_contexts: Sequence[int]) -> float:
        p = self.profile
        compute = p.iteration_time(list(prefill_lens), list(decode_contexts))
        stack = p.overhead_time(len(prefill_lens) + len(decode_contexts), self.num_stages)
        return compute + stack + sum(p.prefill_overhead_time(n, self.num_stages) for n in prefill_lens)

    def prefill_time(self, input_len: int) -> float:
        return self.profile.prefill_time(input_len)

    def swap_time(self, num_tokens: int) -> float:
        return num_tokens * self.kv_bytes_per_token / self.num_stages / self.host_bytes_s

    def describe(self) -> dict[str, Any]:
        p = self.profile
        stack = ({"batch_size": list(p.stack_batch), "seconds": list(p.stack_s), "prefill_len": list(p.stack_prefill_len),
                  "prefill_seconds": list(p.stack_prefill_s)} if p.stack_stages == self.num_stages else None)
        return {"kind": "profile", "meta": p.meta, "num_stages": self.num_stages, "kv_capacity_tokens": self.kv_capacity_tokens,
                "stack_overhead": stack}
