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
