"""Decode step of our StageRunner vs transformers on the same weights, at a real model shape (Llama-3.2-1B-like,
random weights, bf16), with each attention backend (the torch reference, FlashInfer where it runs), per-step
kernel counts and GPU-busy fraction from the profiler, and one fp32 point.

    python model_step_gpu.py OUT.json [--device cuda] [--shape 1b|tiny] [--batch 1,16,64] [--context 512,2048]
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback

import torch

from bench.model_step import our_stepper  # the project's own stepper (prefill, then one decode step per call)
from common.model.layout import blocks_needed
from workers.model.runner import StageRunner

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--device", default="cuda")
p.add_argument("--shape", default="1b")
p.add_argument("--batch", default="1,16,64")
p.add_argument("--context", default="512,2048")
p.add_argument("--steps", type=int, default=8)
p.add_argument("--attention", default="reference,flashinfer", help="our attention backends to time")
p.add_argument("--fp32-point", default="16,2048", help="batch,context of the float32 comparison ('' to skip)")
args = p.parse_args()
dev = args.device
res = {"errors": {}, "rows": []}


def save():
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


def sync():
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def note_error(name, e):
    res["errors"][name] = f"{type(e).__name__}: {e}"[:400]
    res.setdefault("tracebacks", {})[name] = traceback.format_exc()[-1500:]
    save()


SHAPES = {  # a Llama-3.2-1B-like shape (random weights: nothing can be downloaded), and a tiny one for CPU checks
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5),
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-6),
}


def hf_model(dtype):
    import transformers

    cfg = transformers.LlamaConfig(**SHAPES[args.shape], tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
                                   initializer_range=0.02)
    torch.manual_seed(0)
    with torch.device(dev):
        model = transformers.LlamaForCausalLM(cfg)
    return model.eval().to(dtype)


def hf_stepper(model, ids):
    import transformers

    state = {}
    kw = {}
    with torch.inference_mode():
        try:
            state["out"] = model(input_ids=ids, past_key_values=transformers.DynamicCache(), use_cache=True, logits_to_keep=1)
            kw = {"logits_to_keep": 1}
        except TypeError:
            state["out"] = model(input_ids=ids, past_key_values=transformers.DynamicCache(), use_cache=True)

    def step():
        with torch.inference_mode():
            out = state["out"]
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            state["out"] = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True, **kw)
    return step


def timed(fn):
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def profile_step(fn):
    """Kernels launched, their summed device time and the wall time of one step (profiler on)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        sync()
        wall = time.perf_counter() - t0
    dev_events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    busy_us = sum(e.time_range.elapsed_us() for e in dev_events)
    names = [e.name for e in dev_events]
    return {"device_ops": len(dev_events), "device_busy_ms": round(busy_us / 1e3, 3), "wall_ms_profiled": round(wall * 1e3, 3),
            "busy_fraction": round(busy_us / 1e6 / wall, 3) if wall else None,
            "memcpy_ops": sum(1 for n in names if "emcpy" in n), "syncs_cpu_side": sum(
                1 for e in prof.events() if e.device_type == DeviceType.CPU and "ynchronize" in e.name)}


batches = [int(x) for x in args.batch.split(",") if x]
contexts = [int(x) for x in args.context.split(",") if x]
steps = args.steps
res.update(shape=args.shape, dims=SHAPES[args.shape], device=dev, torch=torch.__version__, steps=steps)
try:
    import transformers

    res["transformers"] = transformers.__version__
    if dev.startswith("cuda"):
        res["gpu"] = torch.cuda.get_device_name()
except Exception as e:  # noqa: BLE001
    note_error("import", e)

tmp = tempfile.TemporaryDirectory()
model = runner = None
runners = {}  # attention backend -> StageRunner over the same weights
try:
    t0 = time.perf_counter()
    model = hf_model(torch.bfloat16)
    model.save_pretrained(tmp.name)
    res["hf_build_and_save_s"] = round(time.perf_counter() - t0, 1)
    blocks = max(b * blocks_needed(c + steps + 8, 16) for b in batches for c in contexts)
    res["num_blocks"] = blocks
    for name in [a for a in args.attention.split(",") if a]:
        t0 = time.perf_counter()
        try:
            runners[name] = StageRunner.build(tmp.name, num_blocks=blocks, block_size=16, device=dev, dtype="bfloat16",
                                              attention=name)
            res[f"our_load_{name}_s"] = round(time.perf_counter() - t0, 1)  # FlashInfer's includes its warm-up
        except Exception as e:  # noqa: BLE001  (FlashInfer missing or unfit: the reference still runs)
            res.setdefault("attention_unavailable", {})[name] = f"{type(e).__name__}: {e}"[:300]
    runner = runners.get("reference") or next(iter(runners.values()), None)
except Exception as e:  # noqa: BLE001
    note_error("build", e)

if model is not None and runners:
    vocab = SHAPES[args.shape]["vocab_size"]
    for b in batches:
        for c in contexts:
            row = {"batch": b, "context": c}
            try:
                g = torch.Generator().manual_seed(b * 1000 + c)
                ids = torch.randint(0, vocab, (b, c), generator=g)
                ours = {}
                for name, r in runners.items():
                    sync()
                    t0 = time.perf_counter()
                    ours[name] = our_stepper(r, ids, steps + 4)
                    sync()
                    row[f"ours_{name}_prefill_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
                t0 = time.perf_counter()
                theirs = hf_stepper(model, ids.to(dev))
                sync()
                row["hf_prefill_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
                theirs()
                for fn in ours.values():
                    fn()
                t_o, t_t = {name: [] for name in ours}, []
                for _ in range(steps):  # alternated, so any drift in clocks or load hits every side alike
                    for name, fn in ours.items():
                        t_o[name].append(timed(fn))
                    t_t.append(timed(theirs))
                mt = statistics.median(t_t)
                row.update(hf_ms=round(mt * 1e3, 3), hf_tok_s=round(b / mt))
                for name in ours:
                    mo = statistics.median(t_o[name])
                    row.update({f"ours_{name}_ms": round(mo * 1e3, 3), f"ratio_{name}": round(mo / mt, 3),
                                f"ours_{name}_tok_s": round(b / mo)})
                if dev.startswith("cuda") and b == batches[len(batches) // 2] and c == contexts[-1]:
                    try:
                        for name, fn in ours.items():
                            row[f"ours_{name}_profile"] = profile_step(fn)
                        row["hf_profile"] = profile_step(theirs)
                    except Exception as e:  # noqa: BLE001
                        row["profile_error"] = repr(e)[:300]
                del ours, theirs
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
            save()
            if dev.startswith("cuda"):
                torch.cuda.empty_cache()

runners.clear()  # the fp32 point below needs the memory; `runner` keeps the one it measures
if args.fp32_point and runner is not None:
    b, c = (int(x) for x in args.fp32_point.split(","))
    point = {"batch": b, "context": c}
    try:
        ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (b, c), generator=torch.Generator().manual_seed(7))
        bf16_step = our_stepper(runner, ids, steps + 4)
        bf16_step()
        point["ours_bf16_ms"] = round(statistics.median(timed(bf16_step) for _ in range(steps)) * 1e3, 3)
        pre = ids[:1]
        point["ours_bf16_prefill_1x%d_ms" % c] = round(timed(lambda: our_stepper(runner, pre, 2)) * 1e3, 2)
        del bf16_step
        runner = None
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()
        r32 = StageRunner.build(tmp.name, num_blocks=b * blocks_needed(c + steps + 8, 16), block_size=16, device=dev,
                                dtype="float32")
        f32_step = our_stepper(r32, ids, steps + 4)
        f32_step()
        point["ours_fp32_ms"] = round(statistics.median(timed(f32_step) for _ in range(steps)) * 1e3, 3)
        point["ours_fp32_prefill_1x%d_ms" % c] = round(timed(lambda: our_stepper(r32, pre, 2)) * 1e3, 2)
        if dev.startswith("cuda"):
            torch.backends.cuda.matmul.allow_tf32 = True
            point["ours_fp32_tf32_prefill_1x%d_ms" % c] = round(timed(lambda: our_stepper(r32, pre, 2)) * 1e3, 2)
            torch.backends.cuda.matmul.allow_tf32 = False
        point["decode_fp32_over_bf16"] = round(point["ours_fp32_ms"] / point["ours_bf16_ms"], 2)
        point["prefill_fp32_over_bf16"] = round(point["ours_fp32_prefill_1x%d_ms" % c] / point["ours_bf16_prefill_1x%d_ms" % c], 2)
    except Exception as e:  # noqa: BLE001
        point["error"] = f"{type(e).__name__}: {e}"[:300]
    res["fp32_vs_bf16"] = point
    print(json.dumps(point), flush=True)
res["ok"] = not res["errors"] and all("error" not in r for r in res["rows"])
save()
tmp.cleanup()
sys.exit(0 if res["ok"] else 1)
