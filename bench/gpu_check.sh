#!/usr/bin/env bash
# FastServe GPU readiness check: ONE call on a fresh NVIDIA GPU host, run from the project root.
#
#     OUT=/path/to/results bash gpu_check.sh
#
# What it does, each step under its own timeout inside an overall budget (GPU_CHECK_BUDGET_S, default 465 s), a
# failing step never stopping the next:
#   install        a venv with a CUDA torch from PyPI (2.13.0 = the project's pin, a CUDA 13.0 build, when the driver
#                  is >= 580; else 2.10.0, the last CUDA 12.8 build on PyPI), the CuPy of the same CUDA major
#                  (cupy-cuda13x or cupy-cuda12x 14.2.0), the project's runtime + test requirements, and the project
#                  itself (editable, --no-deps).
#                  Without PyPI it falls back to a python3 that already holds a CUDA torch, plus wheels from ./.whl.
#   env_probe      driver, torch and CuPy builds, CuPy<->torch stream/event interop, stage -> GPU mapping, the
#                  project's one-line GPU readiness check (workers/copy_executor/startup.py)
#   copy_check     CudaCopyExecutor on a real /dev/shm HostPool (cudaHostRegister through CuPy) vs torch pinned copies:
#                  bandwidth (contiguous / scattered / small blocks), copy/compute overlap, upload/offload ordering
#   tests_gpu      pytest tests/gpu with FASTSERVE_REQUIRE_CUDA=1 (a skipped GPU test fails; junit kept)
#   model_step_*   bench.model_step (the project's benchmark, tiny model) on CUDA, and a Llama-3.2-1B-shaped model
#                  (random weights, bf16) vs transformers on the same weights, with our reference and FlashInfer
#                  attention backends, kernel counts and GPU-busy share
#   attn_bench     one decode attention layer at the Llama-3-8B shape: the torch reference (gather + SDPA) vs SDPA on
#                  contiguous K/V vs torch's paged varlen_attn vs the project's FlashInfer backend (where it runs)
#   stack_smoke    `fastserve demo` on CUDA, 2 stages on one GPU, with a tiny device pool, so swaps run through the
#                  real workers and executors
#   cli_paths      `fastserve generate` on CUDA vs CPU, and what a CPU-only torch does on a GPU host
# Results: $OUT/summary.json (everything), $OUT/summary.txt (the table printed at the end), $OUT/logs.txt.
# Knobs: GPU_CHECK_TORCH (torch version), GPU_CHECK_CUPY (requirement), GPU_CHECK_EXTRA_PKGS (e.g.
# "flashinfer-python"), GPU_CHECK_MODE=venv|system, GPU_CHECK_WHEELHOUSE (default ./.whl, see `make gpu-wheels`),
# GPU_CHECK_WORK. Sources: bench/gpu_check/ (`python3 bench/gpu_check/build.py` writes this file from them).
set -u
T0=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-465}
ROOT=$(pwd)
OUT=${OUT:-$ROOT/gpu_check_out}
WORK=${GPU_CHECK_WORK:-/tmp/fastserve-gpu-check}
RES=$WORK/res
LOGS=$WORK/logs
rm -rf "$RES" "$LOGS" "$WORK/py" "$WORK/python"
mkdir -p "$OUT" "$RES" "$LOGS" "$WORK/py" "$WORK/site" "$WORK/cache"
: > "$RES/steps.jsonl"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
  TOKENIZERS_PARALLELISM=false FASTSERVE_CACHE="$WORK/cache"
export PYTHONPATH="$WORK/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
RUN_ID="gpuchk_$$_$(date +%s)"

say() { echo "[gpu_check $(date +%T) +$(( $(date +%s) - T0 ))s] $*"; }
remaining() { echo $(( BUDGET - ($(date +%s) - T0) )); }

step() { # step NAME LIMIT_S CMD... : run under its own timeout, record rc/time in steps.jsonl, never fail the script
  local name=$1 limit=$2; shift 2
  local left=$(( $(remaining) - 25 ))  # room for the summary
  if [ "$left" -lt 15 ]; then
    printf '{"step":"%s","rc":null,"skipped":"out of time budget","limit_s":%d,"seconds":0}\n' "$name" "$limit" >> "$RES/steps.jsonl"
    say "$name: SKIPPED (out of time budget)"; return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  say "$name (limit ${limit}s)"
  local s; s=$(date +%s)
  FASTSERVE_GPU_CHECK_RUN=$RUN_ID timeout -s INT -k 15 "$limit" "$@" > "$LOGS/$name.log" 2>&1 < /dev/null
  local rc=$? d=$(( $(date +%s) - s )) to=false
  { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && to=true
  printf '{"step":"%s","rc":%d,"timed_out":%s,"limit_s":%d,"seconds":%d}\n' "$name" "$rc" "$to" "$limit" "$d" >> "$RES/steps.jsonl"
  say "$name: rc=$rc in ${d}s$([ "$to" = true ] && echo ' (TIMED OUT)')"
  tail -n 4 "$LOGS/$name.log" | cut -c1-220 | sed 's/^/      /'
  return 0
}

skip() { printf '{"step":"%s","rc":null,"skipped":"%s","seconds":0}\n' "$1" "$2" >> "$RES/steps.jsonl"; say "$1: SKIPPED ($2)"; }

reap() { # end processes a step left behind (the stack's children run in their own sessions): only ours, by marker
  local pid
  for pid in $(grep -l "FASTSERVE_GPU_CHECK_RUN=$RUN_ID" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3); do
    [ "$pid" != "$$" ] && kill -TERM "$pid" 2>/dev/null
  done
  sleep 2
  for pid in $(grep -l "FASTSERVE_GPU_CHECK_RUN=$RUN_ID" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3); do
    [ "$pid" != "$$" ] && kill -KILL "$pid" 2>/dev/null
  done
}

SUMMARY_DONE=0
finish() { # the summary is written however the script ends (stdlib only)
  [ "$SUMMARY_DONE" = 1 ] && return
  SUMMARY_DONE=1
  reap
  local spy=${PY_RUN:-${BASE_PY:-python3}}
  "$spy" "$WORK/py/summary.py" "$WORK" "$OUT" || python3 "$WORK/py/summary.py" "$WORK" "$OUT" \
    || { say "summary failed; raw results stay in $WORK"; cp "$RES/steps.jsonl" "$OUT/steps.jsonl" 2>/dev/null; }
  say "done in $(( $(date +%s) - T0 ))s; results in $OUT"
}
PY_RUN=""
BASE_PY=""
trap finish EXIT
trap 'exit 130' INT TERM

# ---- helper programs (written to $WORK/py; the working tree is not touched) ----
cat > "$WORK/py/install.sh" <<'FASTSERVE_GPU_CHECK_EOF'
# Installer for gpu_check.sh (run by it as one timed step). Env in: MODE ROOT WORK BASE_PY TORCH_VERSION CUPY_SPEC
# TRANSFORMERS_SPEC EXTRA_PKGS WHEELHOUSE. Writes $WORK/python (the interpreter later steps use) and $WORK/res/install.json.
set -u
rec() { # key value...: append to the install record (python does the JSON quoting)
  "$BASE_PY" - "$WORK/res/install.json" "$@" <<'PY'
import json, sys
path, *kv = sys.argv[1:]
try:
    d = json.load(open(path))
except Exception:
    d = {}
for k, v in zip(kv[::2], kv[1::2]):
    d[k] = v
json.dump(d, open(path, "w"), indent=1)
PY
}
FIND=()
[ -n "${WHEELHOUSE:-}" ] && [ -d "$WHEELHOUSE" ] && FIND=(--find-links "$WHEELHOUSE")
t0=$(date +%s)

if [ "$MODE" = system ]; then
  # No package index: use the interpreter that already holds a CUDA torch; add what is missing from a wheelhouse.
  rec mode system tool none python "$BASE_PY"
  SITE="$WORK/site"; mkdir -p "$SITE"
  if [ ${#FIND[@]} -gt 0 ] && ls "$WHEELHOUSE"/*.whl >/dev/null 2>&1; then
    # one wheel at a time: a wheel for another Python version is skipped, not fatal to the rest
    ok=0; bad=""
    for w in "$WHEELHOUSE"/*.whl; do
      if "$BASE_PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$w"; then
        ok=$((ok + 1)); else bad="$bad $(basename "$w")"; fi
    done
    rec wheelhouse "installed $ok wheels from $WHEELHOUSE into $SITE; refused:${bad:- none}"
  fi
  echo "$BASE_PY" > "$WORK/python"
else
  VENV="$WORK/venv"
  rm -rf "$VENV"
  if ! "$BASE_PY" -m venv "$VENV"; then
    echo "venv with pip failed (no ensurepip?); bootstrapping pip from PyPI"
    "$BASE_PY" -m venv --without-pip "$VENV" || { rec error "cannot create a venv with $BASE_PY"; exit 3; }
    "$VENV/bin/python" - "$WORK" <<'PY' || { exit 3; }
import json, re, subprocess, sys, urllib.request
work = sys.argv[1]
req = urllib.request.Request("https://pypi.org/simple/pip/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
files = json.load(urllib.request.urlopen(req, timeout=30))["files"]
def key(f):
    m = re.fullmatch(r"pip-(\d+)\.(\d+)(?:\.(\d+))?-py3-none-any\.whl", f["filename"])
    return tuple(int(x or 0) for x in m.groups()) if m else (-1,)
best = max(files, key=key)
path = f"{work}/{best['filename']}"
open(path, "wb").write(urllib.request.urlopen(best["url"], timeout=120).read())
subprocess.check_call([sys.executable, f"{path}/pip", "install", "-q", "--no-index", path])
PY
  fi
  VPY="$VENV/bin/python"
  echo "$VPY" > "$WORK/python"  # later steps use it even if an install below fails (they then report why)
  rec mode venv python "$VPY" base_python "$BASE_PY"
  "$VPY" -m pip install -q --upgrade "pip>=24" "${FIND[@]}" || true
  # the project's own runtime and test requirements, read from pyproject.toml; torch and numpy are pinned below
  DEPS=$("$VPY" - "$ROOT/pyproject.toml" <<'PY'
import sys, tomllib, re
p = tomllib.load(open(sys.argv[1], "rb"))["project"]
reqs = list(p.get("dependencies", [])) + list(p.get("optional-dependencies", {}).get("test", []))
skip = ("torch", "numpy", "transformers")
print(" ".join(r for r in reqs if re.split(r"[<>=!~ \[;]", r, maxsplit=1)[0].strip().lower() not in skip))
PY
)
  # cupy-cuda12x 14 needs numpy >= 2.0, < 2.6
  PKGS=("torch==$TORCH_VERSION" "$CUPY_SPEC" "numpy>=2.0,<2.6" "$TRANSFORMERS_SPEC" $DEPS $EXTRA_PKGS)
  echo "packages: ${PKGS[*]}"
  rec packages "${PKGS[*]}"
  TOOL=pip
  if "$VPY" -m pip install -q "uv==0.13.8" "${FIND[@]}" && [ -x "$VENV/bin/uv" ]; then
    # uv downloads the ~3 GB of torch + CUDA wheels in parallel; it reads no pip.conf, so a local CPU-wheel
    # find-links (torch-2.13.0+cpu satisfies ==2.13.0) cannot sneak in
    if "$VENV/bin/uv" pip install --python "$VPY" "${FIND[@]}" "${PKGS[@]}"; then TOOL=uv; else echo "uv failed; falling back to pip"; fi
  fi
  if [ "$TOOL" = pip ]; then
    # arbitrary equality (===) refuses local-label builds such as 2.13.0+cpu that a pip.conf find-links may offer
    PKGS[0]="torch===$TORCH_VERSION"
    PIP_CONFIG_FILE=/dev/null "$VPY" -m pip install --index-url https://pypi.org/simple "${FIND[@]}" "${PKGS[@]}" \
      || { rec error "pip could not install: ${PKGS[*]}"; }
  fi
  rec tool "$TOOL"
  if [ "$TOOL" = uv ]; then "$VENV/bin/uv" pip install --python "$VPY" --no-deps -e "$ROOT"; else "$VPY" -m pip install -q --no-deps -e "$ROOT"; fi \
    && rec project "installed editable (--no-deps)" || rec project "editable install failed: steps use PYTHONPATH=$ROOT"
  echo "$VPY" > "$WORK/python"
fi
PY_USED=$(cat "$WORK/python")
"$PY_USED" - "$WORK/res/install.json" <<'PY'
import json, sys
path = sys.argv[1]
d = json.load(open(path)) if __import__("os").path.exists(path) else {}
try:
    import torch
    d["torch"] = f"{torch.__version__} (CUDA build {torch.version.cuda})"
    d["torch_cuda_available"] = torch.cuda.is_available()
    if torch.version.cuda is None:
        d["error"] = "torch is a CPU-only build: model.device=cuda cannot work with it"
except Exception as e:
    d["torch"] = f"import failed: {e!r}"
try:
    import cupy
    d["cupy"] = cupy.__version__
except Exception as e:
    d["cupy"] = f"import failed: {e!r}"
for m in ("transformers", "zmq", "structlog", "uvloop", "msgpack", "pytest", "pytest_asyncio"):
    try:
        mod = __import__(m)
        d.setdefault("modules", {})[m] = getattr(mod, "__version__", "ok")
    except Exception as e:
        d.setdefault("modules", {})[m] = f"missing ({type(e).__name__})"
json.dump(d, open(path, "w"), indent=1)
print(json.dumps(d, indent=1))
sys.exit(0 if d.get("torch_cuda_available") else 4)
PY
rc=$?
rec seconds "$(( $(date +%s) - t0 ))"
exit $rc
FASTSERVE_GPU_CHECK_EOF
cat > "$WORK/py/env_probe.py" <<'FASTSERVE_GPU_CHECK_EOF'
"""Environment probe: driver, torch build, CuPy build, cross-runtime stream interop, project device resolution."""
import json, os, platform, subprocess, sys, time, traceback, warnings

out_path = sys.argv[1]
res = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform()}


def run(cmd):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return p.stdout.strip() or p.stderr.strip()
    except Exception as e:  # noqa: BLE001
        return f"error: {e!r}"


res["nvidia_smi"] = run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap,pcie.link.gen.current,"
                         "pcie.link.gen.max,pcie.link.width.current,pcie.link.width.max", "--format=csv,noheader"])
res["nvidia_smi_cuda"] = [l for l in run(["nvidia-smi"]).splitlines() if "CUDA Version" in l][:1]
try:
    st = os.statvfs("/dev/shm")
    res["dev_shm_free_gib"] = round(st.f_bavail * st.f_frsize / 2**30, 1)
except OSError as e:
    res["dev_shm_free_gib"] = f"error: {e}"
res["nproc"] = os.cpu_count()

try:
    import torch
    t = res["torch"] = {"version": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        t.update(device_count=torch.cuda.device_count(), name=torch.cuda.get_device_name(0),
                 capability=list(torch.cuda.get_device_capability(0)), cudnn=torch.backends.cudnn.version(),
                 matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                 sm_count=torch.cuda.get_device_properties(0).multi_processor_count,
                 current_stream_handle=torch.cuda.current_stream().cuda_stream)
        free, total = torch.cuda.mem_get_info()
        t["mem_free_gib"], t["mem_total_gib"] = round(free / 2**30, 1), round(total / 2**30, 1)
        t["has_cudart_hostRegister"] = hasattr(torch.cuda.cudart(), "cudaHostRegister")
        t["has_varlen_attn"] = False
        try:
            from torch.nn.attention.varlen import varlen_attn  # noqa: F401
            t["has_varlen_attn"] = True
        except Exception:  # noqa: BLE001
            pass
except Exception as e:  # noqa: BLE001
    res["torch"] = {"error": repr(e)}

try:
    from importlib import metadata
    res["cupy_dists"] = sorted(d.metadata["Name"] for d in metadata.distributions()
                               if (d.metadata["Name"] or "").lower().startswith("cupy"))
except Exception as e:  # noqa: BLE001
    res["cupy_dists"] = repr(e)

try:
    import cupy
    c = res["cupy"] = {"version": cupy.__version__}
    rt = cupy.cuda.runtime
    c["runtime_version"] = rt.runtimeGetVersion()
    c["driver_version"] = rt.driverGetVersion()
    c["device_count"] = rt.getDeviceCount()
    try:  # elementwise kernels need NVRTC (the [ctk] extra or a system toolkit); the copy executor does not
        c["kernel_ok"] = int(cupy.arange(10).sum()) == 45
    except Exception as e:  # noqa: BLE001
        c["kernel_ok"] = False
        c["kernel_error"] = repr(e)[:300]
    try:
        import torch
        s = torch.cuda.Stream()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            ext = cupy.cuda.ExternalStream(s.cuda_stream)
        c["external_stream_warnings"] = [str(x.message)[:200] for x in w]
        c["external_stream_device_id"] = getattr(ext, "device_id", None)
        if hasattr(cupy.cuda.Stream, "from_external"):
            c["from_external_ok"] = cupy.cuda.Stream.from_external(s).ptr == s.cuda_stream
        # cross-runtime event ordering: a CuPy event recorded on torch's stream after a long kernel
        ev = cupy.cuda.Event()
        with torch.cuda.stream(s):
            torch.cuda._sleep(int(2e7))
        ev.record(ext)
        c["event_pending_after_sleep"] = not ev.done
        ev.synchronize()
        c["event_done_after_sync"] = ev.done
    except Exception as e:  # noqa: BLE001
        c["interop_error"] = repr(e)[:300]
except Exception as e:  # noqa: BLE001
    res["cupy"] = {"error": repr(e)[:300]}

try:
    from workers.model.runner import resolve_device
    r = res["project_resolve_device"] = {}
    for stage in (0, 1):
        try:
            r[f"stage{stage}"] = str(resolve_device("cuda", stage))  # one GPU: both stages on cuda:0
        except Exception as e:  # noqa: BLE001
            r[f"stage{stage}"] = f"{type(e).__name__}: {e}"
except Exception as e:  # noqa: BLE001
    res["project_resolve_device"] = {"error": repr(e)}
try:  # what `make gpu-check` and a CUDA worker's start say about this environment ("" = ready)
    from workers.copy_executor.startup import gpu_problem
    res["project_gpu_problem"] = gpu_problem()
except Exception as e:  # noqa: BLE001
    res["project_gpu_problem"] = f"check failed: {e!r}"[:300]
try:
    from kernels.attention import flashinfer_unfit
    import torch
    res["flashinfer_for_llama_bf16"] = flashinfer_unfit(torch.device("cuda"), 128, torch.bfloat16) or "fits"
except Exception as e:  # noqa: BLE001
    res["flashinfer_for_llama_bf16"] = f"check failed: {e!r}"[:300]

with open(out_path, "w") as f:
    json.dump(res, f, indent=1)
print(json.dumps(res, indent=1))
FASTSERVE_GPU_CHECK_EOF
cat > "$WORK/py/copy_check.py" <<'FASTSERVE_GPU_CHECK_EOF'
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
FASTSERVE_GPU_CHECK_EOF
cat > "$WORK/py/model_step_gpu.py" <<'FASTSERVE_GPU_CHECK_EOF'
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
FASTSERVE_GPU_CHECK_EOF
cat > "$WORK/py/attn_bench.py" <<'FASTSERVE_GPU_CHECK_EOF'
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
FASTSERVE_GPU_CHECK_EOF
cat > "$WORK/py/cli_paths.py" <<'FASTSERVE_GPU_CHECK_EOF'
"""The user-facing paths on this host: `fastserve generate` on CUDA vs CPU, and what a CPU-only torch would do here
(the GPU hidden with CUDA_VISIBLE_DEVICES='' takes the same code path as torch==2.13.0+cpu).

    python cli_paths.py OUT.json
"""
import json
import os
import subprocess
import sys

out_path = sys.argv[1]
py = sys.executable
res = {}


def save():
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1)


def run(cmd, env=None, timeout=120):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        return p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        return 124, (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"


def tokens(out):
    for line in reversed(out.strip().splitlines()):
        try:
            return json.loads(line)["token_ids"]
        except (ValueError, KeyError, TypeError):
            continue
    return None


base = [py, "-m", "services.cli", "generate", "--model", "tiny", "--set", "parallel.num_stages=1",
        "--prompt-ids", "5,17,3,44,9,23,100,7", "--max-tokens", "32"]
got = {}
for name, extra in {"cpu_fp32": ["--set", "model.device=cpu"],
                    "cuda_fp32": ["--set", "model.device=cuda", "--set", "model.dtype=float32"],
                    "cuda_bf16": ["--set", "model.device=cuda"]}.items():  # bfloat16 is the default on CUDA
    rc, out, err = run(base + extra)
    got[name] = tokens(out) if rc == 0 else None
    res[f"generate_{name}"] = {"rc": rc, "tokens": got[name], "stderr_tail": err.strip()[-400:] if rc else ""}
    save()
if got.get("cpu_fp32") and got.get("cuda_fp32"):
    res["cuda_fp32_tokens_equal_cpu"] = got["cpu_fp32"] == got["cuda_fp32"]
if got.get("cpu_fp32") and got.get("cuda_bf16"):
    same = sum(a == b for a, b in zip(got["cpu_fp32"], got["cuda_bf16"]))
    res["cuda_bf16_tokens_matching_cpu_prefix"] = next((i for i, (a, b) in enumerate(zip(got["cpu_fp32"], got["cuda_bf16"])) if a != b), len(got["cpu_fp32"]))
    res["cuda_bf16_tokens_matching_total"] = same

hidden = dict(os.environ, CUDA_VISIBLE_DEVICES="")
rc, out, err = run(base + ["--set", "model.device=cuda"], env=hidden)
res["no_visible_gpu_generate"] = {"rc": rc, "stderr_tail": err.strip()[-300:]}
rc, out, err = run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu"], env=hidden, timeout=180)
res["no_visible_gpu_pytest_tests_gpu"] = {"rc": rc, "summary": (out.strip().splitlines() or [""])[-1]}
rc, out, err = run([py, "-m", "services.cli", "worker", "--stage", "0", "--set", "model.path=tiny",
                    "--set", "parallel.num_stages=1", "--set", "model.device=cuda"], env=hidden, timeout=60)
res["no_visible_gpu_worker"] = {"rc": rc, "stderr_tail": err.strip()[-300:]}
save()
print(json.dumps(res, indent=1))
FASTSERVE_GPU_CHECK_EOF
cat > "$WORK/py/summary.py" <<'FASTSERVE_GPU_CHECK_EOF'
"""Merge the step records and results into $OUT/summary.json, write summary.txt and logs.txt (stdlib only)."""
import glob
import json
import os
import re
import sys
import xml.etree.ElementTree as ET

work, out = sys.argv[1], sys.argv[2]
res_dir, log_dir = os.path.join(work, "res"), os.path.join(work, "logs")


def load(name):
    path = os.path.join(res_dir, name)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        return {"missing": f"{name}: {e.__class__.__name__}"}


steps = []
try:
    with open(os.path.join(res_dir, "steps.jsonl")) as f:
        steps = [json.loads(l) for l in f if l.strip()]
except OSError:
    pass
summary = {"steps": steps}
for extra in ("preflight.json", "install.json"):
    summary[extra.split(".")[0]] = load(extra)
summary["env"] = load("env.json")
summary["copy"] = load("copy.json")
summary["model_step_project_fp32"] = load("model_step_project_fp32.json")
summary["model_step_project_bf16"] = load("model_step_project_bf16.json")
summary["model_step_1b_bf16"] = load("model_step_1b.json")
summary["attention"] = load("attn.json")
summary["cli_paths"] = load("cli.json")

# tests/gpu from the junit file
junit = os.path.join(res_dir, "tests_gpu.xml")
t = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "cases": []}
try:
    root = ET.parse(junit).getroot()
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name')}"
        status, msg = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                status = {"failure": "failed", "error": "errors", "skipped": "skipped"}[tag]
                msg = (el.get("message") or el.text or "")[:400]
                break
        t[status] += 1
        t["cases"].append({"test": name, "status": status, "message": msg, "time_s": case.get("time")})
except (OSError, ET.ParseError) as e:
    t["missing"] = repr(e)
summary["tests_gpu"] = t

# the stack on CUDA: the demo's closing lines and the worker's copy_stats log line
smoke = {}
try:
    text = open(os.path.join(log_dir, "stack_smoke.log"), errors="replace").read()
    m = re.search(r"KV pool whole after the load: (\w+)\s+preemptions (\d+)", text)
    if m:
        smoke.update(kv_whole=m.group(1) == "True", preemptions=int(m.group(2)))
    m = re.search(r"requests (\d+)\s+output tokens (\d+)\s+wall ([\d.]+) s\s+throughput (\d+) tok/s", text)
    if m:
        smoke.update(requests=int(m.group(1)), output_tokens=int(m.group(2)), wall_s=float(m.group(3)), tok_s=int(m.group(4)))
    for line in text.splitlines():
        if "copy_stats" in line or "kvcache_stopped" in line:
            kv = dict(re.findall(r"(\w+)=([^\s]+)", line))
            smoke["copy_stats" if "copy_stats" in line else "kvcache_stopped"] = kv
    smoke["errors_in_log"] = [l[:300] for l in text.splitlines() if re.search(r"Traceback|Error|crashed|exited with", l)][:10]
except OSError as e:
    smoke["missing"] = repr(e)
summary["stack_smoke"] = smoke


def g(d, *path, default=None):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d


lines = []
add = lines.append
env = summary["env"]
add("FastServe GPU check")
add(f"  GPU: {g(env, 'nvidia_smi', default='?')}")
add(f"  torch {g(env, 'torch', 'version')} (CUDA build {g(env, 'torch', 'cuda_build')}), cuda available: "
    f"{g(env, 'torch', 'cuda_available')}; CuPy: {g(env, 'cupy_dists')} {g(env, 'cupy', 'version')} "
    f"(runtime {g(env, 'cupy', 'runtime_version')}, kernels {g(env, 'cupy', 'kernel_ok')})")
add(f"  install: {g(summary, 'install', 'mode')} via {g(summary, 'install', 'tool')}; "
    f"{g(summary, 'install', 'note', default='')}")
add("")
add("steps:")
for s in steps:
    state = s.get("skipped") or ("TIMED OUT" if s.get("timed_out") else ("ok" if s.get("rc") == 0 else f"rc={s.get('rc')}"))
    limit = f" (limit {s['limit_s']}s)" if s.get("limit_s") is not None and not s.get("skipped") else ""
    add(f"  {s['step']:<26} {state:<12} {s.get('seconds', 0):>4}s{limit}")
add("")
add(f"tests/gpu: {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped")
for c in t["cases"]:
    if c["status"] != "passed":
        add(f"  {c['status']}: {c['test']}: {c['message'][:160]}")
cp = summary["copy"]
if isinstance(cp, dict) and "missing" not in cp:
    add("")
    add("copies (GB/s):")
    add(f"  torch pinned baseline: d2h {g(cp, 'pinned_baseline', 'd2h_gbps')}, h2d {g(cp, 'pinned_baseline', 'h2d_gbps')}, "
        f"both ways {g(cp, 'pinned_baseline', 'bidirectional_sum_gbps')}; pageable d2h "
        f"{g(cp, 'pinned_baseline', 'pageable_d2h_gbps')}, h2d {g(cp, 'pinned_baseline', 'pageable_h2d_gbps')}")
    for label, r in (g(cp, "executor", default={}) or {}).items():
        add(f"  executor {label}: register {r.get('construct_and_register_s')} s, torch sees pinned: {r.get('host_pinned_after')}; "
            f"d2h contiguous {g(r, 'd2h_contiguous', 'gbps_wall')}, h2d contiguous {g(r, 'h2d_contiguous', 'gbps_wall')}, "
            f"d2h scattered {g(r, 'd2h_scattered', 'gbps_wall')}, h2d scattered {g(r, 'h2d_scattered', 'gbps_wall')}, "
            f"one op per block {g(r, 'd2h_one_op_per_block', 'gbps_wall')}; gather+1 DMA {r.get('gather_then_one_dma_d2h_gbps')}; "
            f"round trip exact {r.get('round_trip_exact')}")
    for which, r in (g(cp, "overlap", default={}) or {}).items():
        add(f"  overlap ({which}): efficiency {r.get('overlap_efficiency')} (1 = copies fully hidden), executor hidden "
            f"fraction {r.get('executor_hidden_fraction')}, copy {r.get('copy_alone_s')} s + compute {r.get('compute_alone_s')} s "
            f"-> both {r.get('both_s')} s")
    o = g(cp, "ordering", default={}) or {}
    add(f"  ordering: offload waits for queued compute {o.get('offload_waits_for_queued_compute')}; upload waits for a "
        f"queued read {o.get('upload_waited_for_queued_read')}; wait_for orders compute "
        f"{o.get('wait_for_orders_compute_after_upload')}; forward blocks the host on a busy stream "
        f"{o.get('forward_blocks_host_on_busy_stream')}")
    add(f"  per op: {g(cp, 'per_op_overhead', 'submit_us_per_op')} us submit; errors: {list(cp.get('errors', {}).keys())}")
for key in ("model_step_project_fp32", "model_step_project_bf16", "model_step_1b_bf16"):
    ms = summary[key]
    rows = ms.get("rows") if isinstance(ms, dict) else None
    if rows:
        add("")
        add(f"{key} (ours vs transformers, ms per decode step):")
        for r in rows:
            if "error" in r:
                add(f"  batch {r.get('batch')} context {r.get('context')}: ERROR {r['error'][:150]}")
                continue
            hf = r.get("transformers_ms", r.get("hf_ms"))
            if "ours_ms" in r:  # bench.model_step's rows
                ours = f"ours {r.get('ours_ms')} ratio {r.get('ratio')}"
            else:
                ours = ", ".join(f"ours/{k[5:-3]} {v} ratio {r.get('ratio_' + k[5:-3])}" for k, v in r.items()
                                 if k.startswith("ours_") and k.endswith("_ms") and "prefill" not in k)
            add(f"  batch {r['batch']:>3} context {r['context']:>5}: hf {hf}; {ours}")
            for side in [k for k in r if k.endswith("_profile")]:
                if side in r:
                    pr = r[side]
                    add(f"      {side}: {pr.get('device_ops')} device ops, busy {pr.get('device_busy_ms')} ms of "
                        f"{pr.get('wall_ms_profiled')} ms ({pr.get('busy_fraction')}), memcpys {pr.get('memcpy_ops')}, "
                        f"host syncs {pr.get('syncs_cpu_side')}")
        if isinstance(ms, dict) and ms.get("fp32_vs_bf16"):
            add(f"  fp32 vs bf16: {ms['fp32_vs_bf16']}")
    elif isinstance(ms, dict) and ms.get("errors"):
        add(f"{key}: errors {ms['errors']}")
at = summary["attention"]
if isinstance(at, dict) and at.get("cases"):
    add("")
    add("attention, one decode layer (ms): ours (gather+SDPA) / contiguous SDPA / varlen_attn page 16 / page 256 / flashinfer")
    for c in at["cases"]:
        if c["case"].startswith("prefill"):
            add(f"  {c['case']}: " + ", ".join(f"{k}={v}" for k, v in c.items() if k != "case")[:600])
            continue
        add(f"  {c['case']:<22} {c.get('ours_ms')} / {c.get('sdpa_contiguous_ms', '-')} / "
            f"{c.get('varlen_attn_page16_ms', 'err' if 'varlen_attn_page16_error' in c else '-')} / "
            f"{c.get('varlen_attn_page256_ms', 'err' if 'varlen_attn_page256_error' in c else '-')} / "
            f"{c.get('flashinfer_ms', c.get('flashinfer', 'err'))}  (useful KV {c.get('useful_kv_mb')} MB, ours gathers "
            f"{c.get('ours_gathered_kv_mb')} MB, ours {c.get('ours_effective_gbps')} GB/s)")
cli = summary["cli_paths"]
if isinstance(cli, dict) and "missing" not in cli:
    add("")
    add(f"cli: cuda fp32 tokens == cpu: {cli.get('cuda_fp32_tokens_equal_cpu')}; bf16 matches cpu for the first "
        f"{cli.get('cuda_bf16_tokens_matching_cpu_prefix')} tokens")
    add(f"  with no visible GPU (what a CPU-only torch does): generate rc {g(cli, 'no_visible_gpu_generate', 'rc')}, "
        f"tests/gpu '{g(cli, 'no_visible_gpu_pytest_tests_gpu', 'summary')}' rc {g(cli, 'no_visible_gpu_pytest_tests_gpu', 'rc')}, "
        f"worker rc {g(cli, 'no_visible_gpu_worker', 'rc')}")
if smoke:
    add("")
    add(f"stack on CUDA (fastserve demo, 2 stages on one GPU, 32 device blocks): {json.dumps({k: v for k, v in smoke.items() if k != 'kvcache_stopped'})[:600]}")
# verdicts: one line each, PASS / WARN / FAIL / INFO
v = []
cuda_ok = g(env, "torch", "cuda_available")
v.append(("torch sees the GPU", "PASS" if cuda_ok else "FAIL", f"torch {g(env, 'torch', 'version')}"))
if t["passed"] + t["failed"] + t["errors"] + t["skipped"]:
    verdict = "FAIL" if t["failed"] or t["errors"] else ("WARN" if t["skipped"] or not t["passed"] else "PASS")
    v.append(("tests/gpu", verdict, f"{t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped"))
big = g(cp, "executor", "llama8b_bf16_2MiB", default={}) or {}
base = g(cp, "pinned_baseline", "d2h_gbps")
if big and base:
    ratio = (g(big, "d2h_contiguous", "gbps_wall") or 0) / base
    v.append(("executor D2H vs torch pinned", "PASS" if ratio >= 0.8 else "WARN", f"{ratio:.2f} of {base} GB/s"))
if big:
    v.append(("host pool registered & exact round trip", "PASS" if big.get("registered_by_executor") and big.get("round_trip_exact") else "FAIL",
              f"registered {big.get('registered_by_executor')}, exact {big.get('round_trip_exact')}"))
ov = g(cp, "overlap", "legacy_default_stream", default={}) or {}
if ov:
    e = ov.get("overlap_efficiency") or 0
    v.append(("copy/compute overlap (worker's default stream)", "PASS" if e >= 0.8 else "WARN", f"efficiency {e}"))
o = g(cp, "ordering", default={}) or {}
if "upload_waited_for_queued_read" in o:
    v.append(("uploads wait for queued compute", "PASS" if o["upload_waited_for_queued_read"] else "FAIL",
              "a kernel queued before an upload into a reused block read its old contents"))
if "forward_blocks_host_on_busy_stream" in o:
    v.append(("StageRunner.forward queues without blocking the host", "FAIL" if o["forward_blocks_host_on_busy_stream"] else "PASS",
              f"{o.get('forward_host_call_s_busy_stream')} s of {o.get('forward_total_s_busy_stream')} s"))
ov2 = g(cp, "overlap", "legacy_default_stream", "executor_hidden_fraction")
if ov2 is not None:
    v.append(("copy time hidden behind compute (goal >= 0.9)", "PASS" if ov2 >= 0.9 else "WARN", f"hidden fraction {ov2}"))
rows = g(summary, "model_step_1b_bf16", "rows", default=[]) or []
for backend in ("reference", "flashinfer"):
    got = [r for r in rows if f"ratio_{backend}" in r]
    if got:
        worst = max(r[f"ratio_{backend}"] for r in got)
        v.append((f"1B-shape decode, ours ({backend}) / transformers (goal <= 1.0)", "PASS" if worst <= 1.0 else "WARN",
                  ", ".join(f"b{r['batch']}c{r['context']}:{r[f'ratio_{backend}']}" for r in got)))
un = g(summary, "model_step_1b_bf16", "attention_unavailable", default={}) or {}
for backend, why in un.items():
    v.append((f"attention backend {backend}", "SKIPPED", why[:200]))
if smoke.get("copy_stats"):
    ok = smoke.get("kv_whole") and int(smoke["copy_stats"].get("ops_out", "0")) > 0
    v.append(("stack on CUDA with swaps", "PASS" if ok else "WARN", f"ops out/in {smoke['copy_stats'].get('ops_out')}/"
              f"{smoke['copy_stats'].get('ops_in')}, hidden {smoke['copy_stats'].get('hidden_fraction')}"))
elif "stack_smoke" in [s_["step"] for s_ in steps]:
    v.append(("stack on CUDA with swaps", "FAIL", "; ".join(smoke.get("errors_in_log", [])[-2:])[:200]))
summary["verdicts"] = [{"check": a, "verdict": b, "detail": c} for a, b, c in v]
lines[4:4] = ["verdicts:"] + [f"  {b:<9} {a}: {c}" for a, b, c in v] + [""]
text = "\n".join(lines) + "\n"
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1, default=str)
with open(os.path.join(out, "summary.txt"), "w") as f:
    f.write(text)
# one logs file: each step's log, its tail when long
chunks = []
for path in sorted(glob.glob(os.path.join(log_dir, "*.log")), key=os.path.getmtime):
    try:
        data = open(path, errors="replace").read().splitlines()
    except OSError:
        continue
    body = data if len(data) <= 600 else data[:100] + [f"... ({len(data) - 500} lines cut) ..."] + data[-400:]
    chunks.append(f"===== {os.path.basename(path)} =====\n" + "\n".join(l[:2000] for l in body))
with open(os.path.join(out, "logs.txt"), "w") as f:
    f.write("\n\n".join(chunks)[-12_000_000:])
print(text)
FASTSERVE_GPU_CHECK_EOF

# ---- preflight ----
if [ ! -f "$ROOT/pyproject.toml" ] || ! grep -q '^name = "fastserve"' "$ROOT/pyproject.toml"; then
  say "run this from the FastServe project root (no fastserve pyproject.toml in $ROOT)"
fi
SMI=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)
DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)
DRIVER_MAJOR=${DRIVER%%.*}
[[ "$DRIVER_MAJOR" =~ ^[0-9]+$ ]] || DRIVER_MAJOR=0
say "GPU: $SMI"
pick_python() { # first interpreter >= 3.11 (the project needs tomllib); with $1=torch, one whose torch sees CUDA
  local c
  for c in ${GPU_CHECK_PYTHON:-} python3 python3.12 python3.11 python3.13 /usr/bin/python3; do
    command -v "$c" >/dev/null 2>&1 || continue
    if [ "${1:-}" = torch ]; then
      "$c" -c 'import sys, torch; sys.exit(0 if sys.version_info >= (3, 11) and torch.cuda.is_available() else 1)' >/dev/null 2>&1 \
        && { command -v "$c"; return 0; }
    else
      "$c" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1 && { command -v "$c"; return 0; }
    fi
  done
  return 1
}
BASE_PY=$(pick_python) || BASE_PY=""
PYPI=no
if [ -n "$BASE_PY" ] && timeout 15 "$BASE_PY" -c "import urllib.request; urllib.request.urlopen('https://pypi.org/simple/pip/', timeout=10)" >/dev/null 2>&1; then
  PYPI=yes
fi
MODE=${GPU_CHECK_MODE:-}
if [ -z "$MODE" ]; then
  if [ "$PYPI" = yes ]; then MODE=venv; else MODE=system; fi
fi
if [ -z "${GPU_CHECK_TORCH:-}" ]; then
  # PyPI's torch 2.11-2.15 Linux wheels are CUDA 13.0 builds (driver >= 580); 2.10.0 is the last CUDA 12.8 one
  if [ "$DRIVER_MAJOR" -ge 580 ]; then TORCH_VERSION=2.13.0; else TORCH_VERSION=2.10.0; fi
else
  TORCH_VERSION=$GPU_CHECK_TORCH
fi
WHEELHOUSE=${GPU_CHECK_WHEELHOUSE:-$ROOT/.whl}
case "$TORCH_VERSION" in 2.10.*|2.9.*|2.8.*) CUPY_DEFAULT=cupy-cuda12x==14.2.0 ;; *) CUPY_DEFAULT=cupy-cuda13x==14.2.0 ;; esac
"${BASE_PY:-python3}" - "$RES/preflight.json" "$SMI" "$DRIVER" "$BASE_PY" "$PYPI" "$MODE" "$TORCH_VERSION" "$(df -h /dev/shm 2>/dev/null | tail -1)" "$(nproc)" <<'PY' 2>/dev/null
import json, sys
keys = ["nvidia_smi", "driver", "base_python", "pypi_reachable", "mode", "torch_version_chosen", "dev_shm", "nproc"]
json.dump(dict(zip(keys, sys.argv[2:])), open(sys.argv[1], "w"), indent=1)
PY
say "python: ${BASE_PY:-none >= 3.11}; PyPI reachable: $PYPI; mode: $MODE; torch: $TORCH_VERSION"

# ---- install ----
if [ "$MODE" = system ]; then
  SYS_PY=$(pick_python torch) || SYS_PY=""
  if [ -z "$SYS_PY" ]; then
    skip install "mode system: no python3 >= 3.11 whose torch sees CUDA on this machine"
  else
    step install 90 env MODE=system ROOT="$ROOT" WORK="$WORK" BASE_PY="$SYS_PY" WHEELHOUSE="$WHEELHOUSE" bash "$WORK/py/install.sh"
  fi
elif [ -z "$BASE_PY" ]; then
  skip install "no python >= 3.11 with venv on PATH"
else
  step install 300 env MODE=venv ROOT="$ROOT" WORK="$WORK" BASE_PY="$BASE_PY" TORCH_VERSION="$TORCH_VERSION" \
    CUPY_SPEC="${GPU_CHECK_CUPY:-$CUPY_DEFAULT}" TRANSFORMERS_SPEC="${GPU_CHECK_TRANSFORMERS:-transformers==5.23.0}" \
    EXTRA_PKGS="${GPU_CHECK_EXTRA_PKGS:-}" WHEELHOUSE="$WHEELHOUSE" bash "$WORK/py/install.sh"
  if [ ! -s "$WORK/python" ] || ! "$(cat "$WORK/python")" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    SYS_PY=$(pick_python torch) || SYS_PY=""
    if [ -n "$SYS_PY" ]; then
      say "the venv has no working CUDA torch; falling back to $SYS_PY"
      step install_fallback 60 env MODE=system ROOT="$ROOT" WORK="$WORK" BASE_PY="$SYS_PY" WHEELHOUSE="$WHEELHOUSE" bash "$WORK/py/install.sh"
    fi
  fi
fi
PY_RUN=$(cat "$WORK/python" 2>/dev/null || true)

# ---- checks, most informative first ----
if [ -n "$PY_RUN" ] && [ -x "$PY_RUN" ]; then
  step env_probe 45 "$PY_RUN" "$WORK/py/env_probe.py" "$RES/env.json"
  step copy_check 110 "$PY_RUN" "$WORK/py/copy_check.py" "$RES/copy.json"
  step tests_gpu 150 env FASTSERVE_REQUIRE_CUDA=1 "$PY_RUN" -m pytest tests/gpu -v -rA -p no:cacheprovider \
    --junitxml="$RES/tests_gpu.xml"
  step model_step_project_fp32 90 "$PY_RUN" -m bench.model_step --device cuda --dtype float32 --steps 20 \
    --out "$RES/model_step_project_fp32.json"
  step model_step_1b 170 "$PY_RUN" "$WORK/py/model_step_gpu.py" "$RES/model_step_1b.json"
  step attn_bench 75 "$PY_RUN" "$WORK/py/attn_bench.py" "$RES/attn.json"
  # no HTTP front door (not a GPU matter, and it needs fastapi/uvicorn a bare GPU host may lack)
  step stack_smoke 100 "$PY_RUN" -m services.cli demo --model tiny --stages 2 --set model.device=cuda --set endpoints.http= \
    --set cache.num_gpu_blocks=32 --set cache.headroom_blocks=4 --set cache.num_host_blocks=512 --set scheduler.profile= \
    --requests 24 --log-level info
  reap
  step cli_paths 80 "$PY_RUN" "$WORK/py/cli_paths.py" "$RES/cli.json"
  step model_step_project_bf16 60 "$PY_RUN" -m bench.model_step --device cuda --dtype bfloat16 --steps 20 \
    --out "$RES/model_step_project_bf16.json"
else
  for s in env_probe copy_check tests_gpu model_step_project_fp32 model_step_1b attn_bench stack_smoke cli_paths model_step_project_bf16; do
    skip "$s" "no python environment with torch"
  done
fi
finish
exit 0
