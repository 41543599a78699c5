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
@@HELPERS@@

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
