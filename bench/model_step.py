"""One decode iteration of our stack-free model step against transformers' forward with its KV cache.

Same weights (a transformers LlamaForCausalLM of the tiny model's shape, saved and loaded by our
loader), same batch: B jobs each holding `context` cached tokens produce one token each. Both sides
run consecutive decode steps from the same prefilled state, timed alternately (ours, theirs, ours,
...) so that load from other processes hits both alike; the median step time of each is reported.

    python -m bench.model_step [--batch 1,8,32] [--context 128,512] [--steps 20] [--threads 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from workers.model.batch import StepInput
from common.model.layout import blocks_needed
from workers.model.runner import StageRunner
from common.model.spec import ModelSpec, tiny_spec

RESULTS = Path(__file__).parent / "results" / "model_step.json"


def hf_model(spec: ModelSpec, device: str, dtype: torch.dtype):
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, head_dim=spec.head_dim, max_position_embeddings=spec.max_context,
        rope_theta=spec.rope_theta, rms_norm_eps=spec.norm_eps, tie_word_embeddings=False,
        bos_token_id=spec.bos_token_id, eos_token_id=list(spec.eos_token_ids), initializer_range=0.1,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval().to(device, dtype)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def hf_stepper(model, ids: torch.Tensor):
    """Prefill ids [B, C] into a DynamicCache; returns a function that runs one decode step."""
    import transformers

    state = {}
    with torch.inference_mode():
        state["out"] = model(input_ids=ids, past_key_values=transformers.DynamicCache(), use_cache=True)

    def step() -> None:
        with torch.inference_mode():
            out = state["out"]
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            state["out"] = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
    return step


def our_stepper(runner: StageRunner, ids: torch.Tensor, steps: int):
    """Prefill each row of ids [B, C] as one job into the paged pool; returns a one-decode-step function."""
    batch, context = ids.shape
    per_job = blocks_needed(context + steps + 1, runner.block_size)
    tables = [list(range(j * per_job, (j + 1) * per_job)) for j in range(batch)]
    jobs = list(range(batch))
    state = {"ctx": context}
    state["out"] = runner.forward(StepInput(jobs, [context] * batch, [0] * batch, tables, token_ids=ids.flatten()))

    def step() -> None:
        nxt = state["out"].argmax(-1)
        state["out"] = runner.forward(StepInput(jobs, [1] * batch, [state["ctx"]] * batch, tables, token_ids=nxt))
        state["ctx"] += 1
    return step


def compare(runner: StageRunner, model, batch: int, context: int, steps: int, device: str) -> tuple[float, float]:
    """Median seconds of one decode step, ours and transformers', timed alternately so load hits both alike."""
    g = torch.Generator().manual_seed(batch * 1000 + context)
    ids = torch.randint(0, runner.spec.vocab_size, (batch, context), generator=g)
    ours, theirs = our_stepper(runner, ids, steps + 2), hf_stepper(model, ids.to(device))
    ours(), theirs()  # warm-up of this shape
    t_ours, t_theirs = [], []
    for _ in range(steps):
        t_ours.append(_timed(ours, device))
        t_theirs.append(_timed(theirs, device))
    return statistics.median(t_ours), statistics.median(t_theirs)


def measure(batches: list[int], contexts: list[int], steps: int, device: str, dtype_name: str) -> dict:
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype_name]
    spec = tiny_spec()
    model = hf_model(spec, device, dtype)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        model.to(torch.float32).save_pretrained(d)
        model.to(dtype)
        blocks = max(b * blocks_needed(c + steps + 3, 16) for b in batches for c in contexts)
        runner = StageRunner.build(d, num_blocks=blocks, block_size=16, device=device, dtype=dtype_name)
    for b in batches:
        for c in contexts:
            ours, theirs = compare(runner, model, b, c, steps, device)
            rows.append({"batch": b, "context": c, "ours_ms": round(ours * 1e3, 3),
                         "transformers_ms": round(theirs * 1e3, 3), "ratio": round(ours / theirs, 3)})
            print(f"batch {b:>3} context {c:>4}: ours {ours * 1e3:7.2f} ms  transformers {theirs * 1e3:7.2f} ms  "
                  f"ratio {ours / theirs:.3f}", flush=True)
    import transformers

    return {
        "model": "tiny model shape (llama, hidden 256, 4 layers, 8 heads / 4 kv heads, vocab 259)",
        "device": device, "dtype": dtype_name, "steps": steps, "torch": torch.__version__,
        "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.model_step")
    p.add_argument("--batch", default="1,8,32")
    p.add_argument("--context", default="128,512")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 keeps timings steady on a shared machine; both sides use it)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = measure([int(x) for x in args.batch.split(",")], [int(x) for x in args.context.split(",")],
                     args.steps, args.device, args.dtype)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
