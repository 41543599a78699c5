"""One decode attention layer at the Llama-3-8B shape (32 q heads, 8 kv heads, head_dim 128, bf16, 16-token blocks):
the project's torch reference (kernels/paged_attention.py: gather + SDPA) against SDPA over already-contiguous K/V,
torch's own paged varlen_attn (block_table) and, where it runs, the project's FlashInfer backend on the same pool.

    python attn_bench.py OUT.json [--device cuda] [--small]
"""
import argparse
import json
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from kernels.paged_attention import build_meta, paged_attention, store_kv

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--device", default="cuda")
p.add_argument("--small", action="store_true", help="tiny sizes (a logic check on CPU)")
args = p.parse_args()
dev = torch.device(args.device)
cuda = dev.type == "cuda"
H, KV, D, BS = 32, 8, 128, 16
dtype = torch.bfloat16 if cuda else torch.float32
res = {"errors": {}, "cases": [], "shape": {"q_heads": H, "kv_heads": KV, "head_dim": D, "block": BS, "dtype": str(dtype)}}


def save():
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


def bench(fn, reps=20):
    fn()
    if cuda:
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        return statistics.median(times)
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - t0) / 3


def zipf_lengths(n, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g)
    return [int(lo * (hi / lo) ** float(x)) for x in u]  # log-uniform between lo and hi: mostly short, a few long


if args.small:
    CASES = {"B4_equal_64": [64] * 4, "B4_mixed": [17, 64, 5, 40]}
else:
    CASES = {"B32_equal_2048": [2048] * 32, "B32_mixed_16_to_2048": zipf_lengths(32, 16, 2048, 0),
             "B128_equal_1024": [1024] * 128, "B1_32768": [32768]}

for name, lens in CASES.items():
    case = {"case": name, "batch": len(lens), "mean_len": round(sum(lens) / len(lens)), "max_len": max(lens)}
    try:
        b = len(lens)
        per_job = [-(-n // BS) for n in lens]
        num_blocks = sum(per_job) + 1
        g = torch.Generator(device="cpu").manual_seed(1)
        perm = torch.randperm(num_blocks - 1, generator=g).tolist()  # scattered blocks, as after allocator churn
        tables, at = [], 0
        for n in per_job:
            tables.append(perm[at:at + n])
            at += n
        pool = torch.zeros(num_blocks, 1, 2, KV, BS, D, dtype=dtype, device=dev)  # the project's layout, one layer
        pool.normal_()
        q = torch.randn(b, H, D, dtype=dtype, device=dev)
        k = torch.randn(b, KV, D, dtype=dtype, device=dev)
        v = torch.randn(b, KV, D, dtype=dtype, device=dev)
        t0 = time.perf_counter()
        meta = build_meta([1] * b, [n - 1 for n in lens], tables, BS, 1, KV, dev)
        case["build_meta_host_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
        store_kv(pool, 0, k, v, meta)
        scale = D ** -0.5
        out_ref = paged_attention(pool, 0, q, k, v, meta, scale)
        case["ours_ms"] = round(bench(lambda: paged_attention(pool, 0, q, k, v, meta, scale)) * 1e3, 4)
        kv_bytes = sum(lens) * KV * D * 2 * pool.element_size()
        gathered = b * max(per_job) * BS * KV * D * 2 * pool.element_size()
        case["useful_kv_mb"] = round(kv_bytes / 1e6, 1)
        case["ours_gathered_kv_mb"] = round(gathered / 1e6, 1)
        case["ours_effective_gbps"] = round(kv_bytes / (case["ours_ms"] / 1e3) / 1e9, 1)
        case["ours_mask_path"] = not isinstance(meta.decode_mask, int)
        # lower bound of the torch approach: SDPA over K/V that are already contiguous (no gather)
        if len(set(lens)) == 1:
            n = lens[0]
            kc = torch.randn(b, KV, n, D, dtype=dtype, device=dev)
            vc = torch.randn_like(kc)
            qd = q.view(b, KV, H // KV, D)
            case["sdpa_contiguous_ms"] = round(bench(lambda: F.scaled_dot_product_attention(qd, kc, vc, scale=scale)) * 1e3, 4)
            case["sdpa_contiguous_gbps"] = round(kv_bytes / (case["sdpa_contiguous_ms"] / 1e3) / 1e9, 1)
            del kc, vc
        # torch's own paged attention: varlen_attn with a block table (NHD pages: [pages, page_size, kv_heads, D])
        for page in (16, 256):
            key = f"varlen_attn_page{page}"
            try:
                from torch.nn.attention.varlen import varlen_attn

                pp = [-(-n // page) for n in lens]
                kp = torch.randn(sum(pp) + 1, page, KV, D, dtype=dtype, device=dev)
                vp = torch.randn_like(kp)
                width = max(pp)
                bt, at = [], 0
                for n in pp:
                    bt.append(list(range(at, at + n)) + [0] * (width - n))
                    at += n
                bt = torch.tensor(bt, dtype=torch.int32, device=dev)
                cu_q = torch.arange(b + 1, dtype=torch.int32, device=dev)
                cu_k = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
                used = torch.tensor(lens, dtype=torch.int32, device=dev)
                fn = lambda: varlen_attn(q, kp, vp, cu_q, cu_k, 1, max(lens), scale=scale, enable_gqa=True,  # noqa: E731
                                         seqused_k=used, block_table=bt)
                case[f"{key}_ms"] = round(bench(fn) * 1e3, 4)
                case[f"{key}_gbps"] = round(kv_bytes / (case[f"{key}_ms"] / 1e3) / 1e9, 1)
                del kp, vp
            except Exception as e:  # noqa: BLE001
                case[f"{key}_error"] = f"{type(e).__name__}: {e}"[:300]
        # the project's FlashInfer backend (kernels/attention.py) on the same pool, planned once per step
        try:
            from kernels.attention import FlashInferAttention, flashinfer_unfit

            why = flashinfer_unfit(dev, D, dtype)
            if why:
                case["flashinfer"] = f"not run: {why}"
            else:
                fi = FlashInferAttention(dev, H, KV, D, BS, dtype, scale)
                t0 = time.perf_counter()
                fi.plan(meta)
                torch.cuda.synchronize()
                case["flashinfer_plan_host_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
                out_fi = fi.attend(pool, 0, q, k, v, meta)
                case["flashinfer_ms"] = round(bench(lambda: fi.attend(pool, 0, q, k, v, meta)) * 1e3, 4)
                case["flashinfer_gbps"] = round(kv_bytes / (case["flashinfer_ms"] / 1e3) / 1e9, 1)
                case["flashinfer_max_abs_diff_vs_ours"] = float((out_fi.float() - out_ref.float()).abs().max())
                case["flashinfer_over_ours"] = round(case["flashinfer_ms"] / case["ours_ms"], 3)
        except Exception as e:  # noqa: BLE001
            case["flashinfer_error"] = f"{type(e).__name__}: {e}"[:300]
        del pool
        if cuda:
            torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001
        case["error"] = f"{type(e).__name__}: {e}"[:300]
        res.setdefault("tracebacks", {})[name] = traceback.format_exc()[-1500:]
    res["cases"].append(case)
    print(json.dumps(case), flush=True)
    save()
# a prefill over cached context (chunked prefill, or a dropped job's redo): bool mask + GQA; which SDPA kernel takes it?
pc = {"case": "prefill_512_over_1536_cached"}
try:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    new, ctx = (32, 96) if args.small else (512, 1536)
    nb = -(-(new + ctx) // BS)
    pool = torch.randn(nb + 1, 1, 2, KV, BS, D, dtype=dtype, device=dev)
    q = torch.randn(new, H, D, dtype=dtype, device=dev)
    k = torch.randn(new, KV, D, dtype=dtype, device=dev)
    v = torch.randn_like(k)
    meta = build_meta([new], [ctx], [list(range(1, nb + 1))], BS, 1, KV, dev)
    store_kv(pool, 0, k, v, meta)
    pc["ours_ms"] = round(bench(lambda: paged_attention(pool, 0, q, k, v, meta, D ** -0.5)) * 1e3, 4)
    qp = q.transpose(0, 1)[None]
    kp = torch.randn(1, KV, new + ctx, D, dtype=dtype, device=dev)
    vp = torch.randn_like(kp)
    mask = torch.arange(new + ctx, device=dev)[None, :] <= (torch.arange(new, device=dev)[:, None] + ctx)
    for be in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        try:
            with sdpa_kernel(getattr(SDPBackend, be)):
                t = bench(lambda: F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, enable_gqa=True), reps=5)
            pc[f"sdpa_{be.lower()}_ms"] = round(t * 1e3, 4)
        except Exception as e:  # noqa: BLE001
            pc[f"sdpa_{be.lower()}"] = f"refused: {str(e).splitlines()[0][:160]}"
except Exception as e:  # noqa: BLE001
    pc["error"] = f"{type(e).__name__}: {e}"[:300]
res["cases"].append(pc)
print(json.dumps(pc), flush=True)
res["ok"] = all("error" not in c for c in res["cases"])
save()
sys.exit(0 if res["ok"] else 1)
