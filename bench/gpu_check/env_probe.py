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
