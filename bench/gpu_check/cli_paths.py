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
