"""CudaCopyExecutor on the real host-pool path (a /dev/shm HostPool, cudaHostRegister through CuPy) against plain
pinned-memory copies; copy/compute overlap; the ordering of uploads and offloads against the compute stream.

    python copy_check.py OUT.json        (run from the project root; needs CUDA and CuPy)
"""
import itertools
import json
import os
import sys
import time
import traceback
import uuid
import warnings

import torch

out_path = sys.argv[1]
res = {"errors": {}, "notes": []}


def save():
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1)


def guarded(name):
    def deco(fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            except Exception as e:  # noqa: BLE001  (each sub-check reports its own failure)
                res["errors"][name] = f"{type(e).__name__}: {e}"[:500]
                res.setdefault("tracebacks", {})[name] = traceback.format_exc()[-2000:]
                return None
            finally:
                res.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 2)
                save()
        return wrapper
    return deco


def sync():
    if not FAKE:
        torch.cuda.synchronize()


def gbps(nbytes, seconds):
    return round(nbytes / seconds / 1e9, 2) if seconds and seconds > 0 else None


FAKE = os.environ.get("GPU_CHECK_FAKE_CPU") == "1"  # logic test on a CPU machine: CPU executor, no CUDA parts
if not FAKE and not torch.cuda.is_available():
    res["errors"]["setup"] = f"CUDA not available (torch {torch.__version__}, cuda build {torch.version.cuda})"
    save()
    sys.exit(1)

dev = torch.device("cpu") if FAKE else torch.device("cuda", 0)
if not FAKE:
    torch.cuda.set_device(dev)
    torch.ones(1, device=dev)  # context up before any timing
SLEEP_CYCLES = int(2e8)  # about 0.1 s of GPU time at Hopper clocks: long enough to expose ordering races

from services.kvcache.books import Direction, SwapOp  # noqa: E402
from common.hostpool import HostPool, HostPoolLayout  # noqa: E402
from workers.copy_executor.base import block_runs  # noqa: E402

try:
    import cupy

    res["versions"] = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cupy": cupy.__version__,
                       "cupy_runtime": cupy.cuda.runtime.runtimeGetVersion(),
                       "driver": cupy.cuda.runtime.driverGetVersion()}
except Exception as e:  # noqa: BLE001
    if not FAKE:
        res["errors"]["cupy_import"] = repr(e)[:300]

ids = itertools.count()
shm_free = os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize
res["dev_shm_free_gib"] = round(shm_free / 2**30, 2)


@guarded("pinned_baseline")
def pinned_baseline(nbytes=1 << 30):
    """Plain torch: pinned (cudaHostAlloc) vs pageable host buffers, one big copy each way, on a side stream."""
    r = res["pinned_baseline"] = {"bytes": nbytes}
    h = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    d = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    s = torch.cuda.Stream()
    for name, (dst, src) in {"d2h": (h, d), "h2d": (d, h)}.items():
        times = []
        for _ in range(4):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(s):
                a.record()
                dst.copy_(src, non_blocking=True)
                b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        r[f"{name}_gbps"] = gbps(nbytes, sorted(times[1:])[1])
    h2 = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    d2, s2 = torch.empty_like(d), torch.cuda.Stream()
    sync()
    t0 = time.perf_counter()
    with torch.cuda.stream(s):
        h.copy_(d, non_blocking=True)
    with torch.cuda.stream(s2):
        d2.copy_(h2, non_blocking=True)
    sync()
    r["bidirectional_sum_gbps"] = gbps(2 * nbytes, time.perf_counter() - t0)
    hp = torch.empty(nbytes // 4, dtype=torch.uint8)  # pageable: what an unregistered host pool gets
    dp = d[: nbytes // 4]
    for name, (dst, src) in {"pageable_d2h": (hp, dp), "pageable_h2d": (dp, hp)}.items():
        dst.copy_(src)
        sync()
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        r[f"{name}_gbps"] = gbps(nbytes // 4, time.perf_counter() - t0)
    del h, d, h2, d2, hp


def make_pool(block_shape, dtype, num_host, num_dev):
    name = f"fsgpuchk_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    layout = HostPoolLayout(num_host, (tuple(block_shape),), dtype)
    pool = HostPool.create(name, layout, replace=True)
    host = pool.view(0)
    device = torch.randn(num_dev, *block_shape, device=dev, dtype=torch.float32).to(dtype)
    return pool, host, device


def new_executor(device, host, compute_stream=None):
    if FAKE:
        from workers.copy_executor.cpu import CpuCopyExecutor as CudaCopyExecutor
    else:
        from workers.copy_executor.cuda import CudaCopyExecutor

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        ex = CudaCopyExecutor(device, host) if FAKE else CudaCopyExecutor(device, host, compute_stream)
        dt = time.perf_counter() - t0
    return ex, dt, [f"{x.category.__name__}: {str(x.message)[:160]}" for x in w]


def run_ops(ex, ops):
    before = ex.stats()
    t0 = time.perf_counter()
    for op in ops:
        ex.submit(op)
    t_submit = time.perf_counter() - t0
    ex.flush()
    t_wall = time.perf_counter() - t0
    after = ex.stats()
    nbytes = (after.bytes_out + after.bytes_in) - (before.bytes_out + before.bytes_in)
    gpu_s = after.copy_s - before.copy_s
    return {"bytes": nbytes, "gpu_copy_s": round(gpu_s, 5), "gbps_gpu_timeline": gbps(nbytes, gpu_s),
            "wall_s": round(t_wall, 5), "gbps_wall": gbps(nbytes, t_wall), "host_submit_s": round(t_submit, 5)}


def executor_bandwidth(label, block_shape, dtype, num_dev, num_host, n):
    r = res.setdefault("executor", {})[label] = {"block_shape": list(block_shape), "dtype": str(dtype)}
    pool, host, device = make_pool(block_shape, dtype, num_host, num_dev)
    block_bytes = device[0].numel() * device.element_size()
    r["block_bytes"] = block_bytes
    r["host_pool_bytes"] = host.numel() * host.element_size()
    r["host_pinned_before"] = bool(host.is_pinned())
    ex, t_reg, warns = new_executor(device, host)
    r["construct_and_register_s"] = round(t_reg, 3)
    r["register_gbps"] = gbps(r["host_pool_bytes"], t_reg)
    r["registered_by_executor"] = getattr(ex, "_registered", None)
    r["host_pinned_after"] = bool(host.is_pinned())  # torch sees CuPy's registration (same primary context)?
    r["warnings"] = warns
    g = torch.Generator().manual_seed(0)
    try:
        contig = list(range(n))
        d_perm = torch.randperm(num_dev, generator=g)[:n].tolist()
        h_perm = torch.randperm(num_host, generator=g)[:n].tolist()
        cases = {
            "d2h_contiguous": [SwapOp(next(ids), "c", Direction.OUT, tuple(zip(contig, contig)))],
            "h2d_contiguous": [SwapOp(next(ids), "c", Direction.IN, tuple(zip(contig, contig)))],
            "d2h_scattered": [SwapOp(next(ids), "s", Direction.OUT, tuple(zip(d_perm, h_perm)))],
            "h2d_scattered": [SwapOp(next(ids), "s", Direction.IN, tuple(zip(h_perm, d_perm)))],
            "d2h_one_op_per_block": [SwapOp(next(ids), f"j{i}", Direction.OUT, ((a, b),)) for i, (a, b) in enumerate(zip(d_perm, h_perm))],
        }
        run_ops(ex, [SwapOp(next(ids), "w", Direction.OUT, tuple(zip(contig, contig)))])  # warm-up
        for name, ops in cases.items():
            m = run_ops(ex, ops)
            calls = sum(len(block_runs(o.src_blocks, o.dst_blocks)) for o in ops)
            m["memcpy_calls"] = calls
            m["host_submit_us_per_memcpy"] = round(m["host_submit_s"] / calls * 1e6, 2)
            r[name] = m
        # exact round trip through scattered host blocks
        sync()
        orig = device[torch.tensor(d_perm, device=dev)].clone()
        run_ops(ex, [SwapOp(next(ids), "rt", Direction.OUT, tuple(zip(d_perm, h_perm)))])
        sync()
        device.zero_()
        # no sync here: the executor orders the upload after the zero_ queued on the compute stream
        back = [(i * 7 + 3) % num_dev for i in range(n)]
        if len(set(back)) != n:
            back = list(range(n))
        run_ops(ex, [SwapOp(next(ids), "rt", Direction.IN, tuple(zip(h_perm, back)))])
        sync()
        r["round_trip_exact"] = bool(torch.equal(device[torch.tensor(back, device=dev)], orig))
        if FAKE:
            return
        # torch-only alternative: the same registered host pool, copies issued by torch on a side stream
        s = torch.cuda.Stream()
        nb = n * block_bytes
        sync()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(s):
            a.record()
            host[:n].copy_(device[:n], non_blocking=True)
            b.record()
        b.synchronize()
        r["torch_copy_into_registered_pool_d2h_gbps"] = gbps(nb, a.elapsed_time(b) / 1e3)
        # scattered small blocks the other way: gather on the device into a staging buffer, then one DMA
        idx = torch.tensor(d_perm, device=dev)
        staging = torch.empty((n, *block_shape), dtype=dtype, pin_memory=True)
        sync()
        with torch.cuda.stream(s):
            a.record()
            staging.copy_(device.index_select(0, idx), non_blocking=True)
            b.record()
        b.synchronize()
        r["gather_then_one_dma_d2h_gbps"] = gbps(nb, a.elapsed_time(b) / 1e3)
    finally:
        ex.close()
        r["host_pinned_after_close"] = bool(host.is_pinned())
        del host
        pool.close()
    del device
    if not FAKE:
        torch.cuda.empty_cache()


@guarded("executor_small_blocks")
def small_blocks():
    # the built-in model's block on one of 2 stages: 2 layers x K,V x 4 kv heads x 16 tokens x 32 dims, float32 = 32 KiB
    executor_bandwidth("default_model_32KiB", (2, 2, 4, 16, 32), torch.float32, 4096, 8192, 4096)


@guarded("executor_large_blocks")
def large_blocks():
    # Llama-3-8B on one stage: 32 layers x K,V x 8 kv heads x 16 tokens x 128 dims, bf16 = 2 MiB per block
    num = 1024
    while num > 64 and num * (2 << 20) > 0.45 * shm_free:
        num //= 2
    if num < 1024:
        res["notes"].append(f"/dev/shm has {shm_free / 2**30:.1f} GiB free: large-block pool cut to {num} blocks")
    executor_bandwidth("llama8b_bf16_2MiB", (32, 2, 8, 16, 128), torch.bfloat16, num, num, num // 2)


def _matmul_chain(k, a, b, c):
    for _ in range(k):
        torch.mm(a, b, out=c)


@guarded("overlap")
def overlap():
    """Copies on the executor's stream while bf16 matmuls run on the compute stream (default, then a side stream)."""
    r = res["overlap"] = {}
    shape, dtype = (32, 2, 8, 16, 128), torch.bfloat16
    num = 512
    while num > 64 and num * (2 << 20) > 0.45 * shm_free:
        num //= 2
    pool, host, device = make_pool(shape, dtype, num, num)
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b, c = torch.randn_like(a), torch.empty_like(a)
    half = num // 2
    try:
        for which in ("legacy_default_stream", "side_stream"):
            stream = torch.cuda.current_stream() if which == "legacy_default_stream" else torch.cuda.Stream()
            ex, _, _ = new_executor(device, host, stream if which == "side_stream" else None)
            try:
                ops = lambda: [SwapOp(next(ids), "o", Direction.OUT, tuple((i, i) for i in range(half))),  # noqa: E731
                               SwapOp(next(ids), "i", Direction.IN, tuple((half + i, half + i) for i in range(half)))]
                run_ops(ex, ops())  # warm-up
                t0 = time.perf_counter()
                run_ops(ex, ops())
                t_copy = time.perf_counter() - t0
                with torch.cuda.stream(stream):
                    _matmul_chain(2, a, b, c)
                sync()
                t0 = time.perf_counter()
                with torch.cuda.stream(stream):
                    _matmul_chain(4, a, b, c)
                sync()
                t_mm = (time.perf_counter() - t0) / 4
                k = max(4, int(1.5 * t_copy / t_mm) + 1)
                t0 = time.perf_counter()
                with torch.cuda.stream(stream):
                    _matmul_chain(k, a, b, c)
                sync()
                t_compute = time.perf_counter() - t0
                before = ex.stats()
                sync()
                t0 = time.perf_counter()
                with torch.cuda.stream(stream):
                    ex.compute_begin()
                    for op in ops():
                        ex.submit(op)
                    _matmul_chain(k, a, b, c)
                    ex.compute_end()
                sync()
                ex.flush()
                t_both = time.perf_counter() - t0
                after = ex.stats()
                copy_s = after.copy_s - before.copy_s
                ov = after.overlap_s - before.overlap_s
                r[which] = {
                    "copy_alone_s": round(t_copy, 4), "compute_alone_s": round(t_compute, 4), "both_s": round(t_both, 4),
                    "serial_would_be_s": round(t_copy + t_compute, 4),
                    "overlap_efficiency": round((t_copy + t_compute - t_both) / min(t_copy, t_compute), 3),
                    "executor_hidden_fraction": round(ov / copy_s, 3) if copy_s else None,
                    "copy_gbps_alone": gbps(num * (2 << 20), t_copy),
                    "copy_gbps_under_compute": gbps(num * (2 << 20), copy_s),
                    "matmuls": k,
                }
            finally:
                ex.close()
    finally:
        del host
        pool.close()


@guarded("ordering")
def ordering():
    """Offloads and uploads both wait for compute already queued (no read-after-write or write-after-read hazard)."""
    r = res["ordering"] = {}
    shape, dtype = (4, 2, 8, 16, 128), torch.bfloat16
    pool, host, device = make_pool(shape, dtype, 64, 64)
    ex, _, _ = new_executor(device, host)
    try:
        sync()
        host[0].zero_()
        torch.cuda._sleep(SLEEP_CYCLES)
        device[0].fill_(7.0)  # queued behind the sleep on the compute stream
        ex.submit(SwapOp(next(ids), "a", Direction.OUT, ((0, 0),)))
        ex.flush()
        sync()
        r["offload_waits_for_queued_compute"] = bool((host[0] == 7).all())

        host[1].fill_(3.0)
        device[1].fill_(1.0)
        sync()
        torch.cuda._sleep(SLEEP_CYCLES)
        snap = device[1].clone()  # a queued kernel that still reads block 1 (a job that just finished, say)
        ex.submit(SwapOp(next(ids), "b", Direction.IN, ((1, 1),)))  # the block is reused for an upload
        ex.flush()
        sync()
        r["upload_waited_for_queued_read"] = bool((snap == 1).all())
        r["upload_waited_for_queued_read_meaning"] = (
            "true = a kernel queued before the upload read the block's old contents: the copy stream waited for "
            "the compute stream (every op waits on an event of it), so the worker's per-batch sync is not what "
            "keeps KV correct")

        host[2].fill_(5.0)
        device[2].fill_(1.0)
        sync()
        ex.submit(SwapOp(next(ids), "busy", Direction.IN, tuple((8 + i, 8 + i) for i in range(48))))
        ex.submit(SwapOp(next(ids), "c", Direction.IN, ((2, 2),)))
        ex.wait_for(["c"])
        snap = device[2].clone()
        sync()
        r["wait_for_orders_compute_after_upload"] = bool((snap == 5).all())

        # does the worker's forward block the host while its compute stream waits on a pending upload?
        from workers.model.batch import StepInput
        from workers.model.runner import StageRunner

        runner = StageRunner.build("tiny", num_blocks=64, block_size=16, device="cuda", dtype="bfloat16")
        step = StepInput([0], [16], [0], [[0]], token_ids=torch.arange(16))
        runner.forward(step)
        sync()
        t0 = time.perf_counter()
        runner.forward(step)
        t_plain = time.perf_counter() - t0
        sync()
        torch.cuda._sleep(SLEEP_CYCLES)  # stands in for a long upload the batch must wait for
        t0 = time.perf_counter()
        runner.forward(step)
        t_host = time.perf_counter() - t0
        sync()
        t_total = time.perf_counter() - t0
        r["forward_host_call_s_idle_stream"] = round(t_plain, 4)
        r["forward_host_call_s_busy_stream"] = round(t_host, 4)
        r["forward_total_s_busy_stream"] = round(t_total, 4)
        r["forward_blocks_host_on_busy_stream"] = t_host > 0.5 * t_total
    finally:
        ex.close()
        del host
        pool.close()


@guarded("per_op_overhead")
def per_op_overhead():
    shape, dtype = (2, 2, 4, 16, 32), torch.float32
    pool, host, device = make_pool(shape, dtype, 4096, 4096)
    ex, _, _ = new_executor(device, host)
    try:
        ops = [SwapOp(next(ids), f"j{i}", Direction.OUT, ((i, i),)) for i in range(2000)]
        t0 = time.perf_counter()
        for op in ops:
            ex.submit(op)
        t_submit = time.perf_counter() - t0
        ex.flush()
        t0 = time.perf_counter()
        done = ex.poll()
        t_poll = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(1000):
            ex.poll()
        t_idle = (time.perf_counter() - t0) / 1000
        res["per_op_overhead"] = {"submit_us_per_op": round(t_submit / len(ops) * 1e6, 2),
                                  "poll_acking_2000_ops_ms": round(t_poll * 1e3, 2), "acked": len(done),
                                  "idle_poll_us": round(t_idle * 1e6, 2)}
    finally:
        ex.close()
        del host
        pool.close()


if not FAKE:
    pinned_baseline()
large_blocks()
small_blocks()
if not FAKE:
    overlap()
    ordering()
per_op_overhead()
res["ok"] = not res["errors"]
save()
print(json.dumps({k: v for k, v in res.items() if k != "tracebacks"}, indent=1))
sys.exit(0 if res["ok"] else 1)
