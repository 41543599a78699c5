"""The CUDA copy executor against a stand-in CuPy on CPU memory: stream order, event timing, pinning, imports."""

import ctypes
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from services.kvcache.books import Direction, SwapOp
from workers.copy_executor import CopyError
from workers.copy_executor.cuda import CudaCopyExecutor, EventClock
from workers.copy_executor.startup import check_shm_room, import_cupy, wait_for_segment

BLOCK = (2, 2, 4, 8)  # layers, k/v, tokens, dim: 512 bytes in float32


class FakeGpu:
    """One GPU timeline: every recorded event completes at once unless `hold`; copies really copy (host memory)."""

    def __init__(self, device=0, runtime_version=13000):
        self.now = 0.0  # seconds on the fake GPU clock
        self.copy_s = 3e-6  # each memcpy advances the clock this much
        self.log = []
        self.hold = False
        self.device = device
        self.registered = []
        gpu = self

        class RuntimeFailure(Exception):
            def __init__(self, status):
                super().__init__(f"cuda error {status}")
                self.status = status

        class Event:
            def __init__(self, disable_timing=False):
                self.t, self.done_flag = None, False

            def record(self, stream):
                self.t, self.done_flag = gpu.now, not gpu.hold
                gpu.log.append(("record", stream.name, self))

            @property
            def done(self):
                return self.done_flag

            def synchronize(self):
                self.done_flag = True

        class Stream:
            def __init__(self, non_blocking=False, name="copy", ptr=1):
                self.name, self.ptr = name, ptr

            def wait_event(self, event):
                gpu.log.append(("wait", self.name, event))

            def synchronize(self):
                for entry in gpu.log:
                    if entry[0] == "record" and entry[1] == self.name:
                        entry[2].done_flag = True

        def memcpy(dst, src, n, kind, stream):
            ctypes.memmove(dst, src, n)
            gpu.now += gpu.copy_s
            gpu.log.append(("memcpy", kind, n))

        def host_register(ptr, n, flags):
            gpu.registered.append((ptr, n))

        def elapsed(a, b):  # float32 milliseconds between two timestamps, as cudaEventElapsedTime reports them
            return float(np.float32((b.t - a.t) * 1e3))

        runtime = SimpleNamespace(
            getDevice=lambda: gpu.device, hostRegister=host_register,
            hostUnregister=lambda ptr: gpu.registered.pop(), memcpyAsync=memcpy, memcpyDeviceToHost=2,
            memcpyHostToDevice=1, CUDARuntimeError=RuntimeFailure, runtimeGetVersion=lambda: runtime_version)
        self.cupy = SimpleNamespace(cuda=SimpleNamespace(
            runtime=runtime, Event=Event, Stream=Stream, get_elapsed_time=elapsed,
            ExternalStream=lambda ptr, device_id: Stream(name="compute", ptr=ptr)))


def make(gpu=None, device_blocks=8, host_blocks=8):
    gpu = gpu or FakeGpu()
    g = torch.Generator().manual_seed(0)
    device, host = torch.randn(device_blocks, *BLOCK, generator=g), torch.zeros(host_blocks, *BLOCK)
    ex = CudaCopyExecutor(device, host, SimpleNamespace(cuda_stream=7), cupy=gpu.cupy)
    return gpu, ex, device, host


def test_every_op_waits_for_the_compute_stream_before_it_copies():
    gpu, ex, _, _ = make()
    gpu.log.clear()
    ex.submit(SwapOp(0, "a", Direction.OUT, ((1, 2),)))
    ex.submit(SwapOp(1, "b", Direction.IN, ((2, 5), (3, 6))))  # an upload into blocks compute may still read
    ops = [i for i, e in enumerate(gpu.log) if e[0] == "memcpy"]
    assert len(ops) == 2  # the upload's two consecutive blocks are one memcpy
    for at in ops:
        before = gpu.log[:at]
        waits = [i for i, e in enumerate(before) if e[:2] == ("wait", "copy")]
        last_wait = waits[-1]
        marker = before[last_wait][2]
        recorded = [i for i, e in enumerate(before) if e[0] == "record" and e[2] is marker]
        assert recorded and gpu.log[recorded[0]][1] == "compute" and recorded[0] < last_wait
        # the wait belongs to this op: no other memcpy between it and this one
        assert not any(e[0] == "memcpy" for e in gpu.log[last_wait:at])


def test_round_trip_is_exact_and_the_pool_is_pinned_once():
    gpu, ex, device, host = make()
    assert gpu.registered == [(host.data_ptr(), host.numel() * 4)]
    original = device.clone()
    ex.submit(SwapOp(0, "a", Direction.OUT, ((1, 4), (2, 5), (6, 0))))
    device.zero_()
    ex.submit(SwapOp(1, "a", Direction.IN, ((4, 3), (5, 7), (0, 0))))
    ex.flush()
    assert ex.poll() == [0, 1]
    assert torch.equal(device[3], original[1]) and torch.equal(device[7], original[2]) and torch.equal(device[0], original[6])
    stats = ex.stats()
    assert (stats.ops_out, stats.ops_in, stats.bytes_in) == (1, 1, 3 * 512)
    ex.close()
    assert gpu.registered == []


def test_compute_waits_on_the_end_events_of_the_jobs_it_runs_only():
    gpu, ex, _, _ = make()
    gpu.hold = True
    ex.submit(SwapOp(0, "x", Direction.IN, ((0, 0),)))
    ex.submit(SwapOp(1, "y", Direction.IN, ((1, 1),)))
    x_end = ex._by_job["x"][0]
    gpu.log.clear()
    ex.wait_for(["x", "never-copied"])
    assert gpu.log == [("wait", "compute", x_end)]
    assert ex.poll() == []  # nothing completed yet: no ack


def test_copy_time_stays_exact_after_hours_of_uptime():
    gpu, ex, _, _ = make()
    gpu.now = 4 * 3600.0  # float32 milliseconds this far out step by 1 ms, far coarser than one copy
    ex.compute_begin()
    gpu.now += 1e-6
    ex.submit(SwapOp(0, "a", Direction.OUT, ((1, 1),)))
    gpu.now += 1e-5
    ex.compute_end()
    ex.poll()
    stats = ex.stats()
    assert stats.copy_s == pytest.approx(3e-6, abs=1e-7)
    assert stats.compute_s == pytest.approx(1.4e-5, abs=1e-7)
    assert stats.overlap_s == pytest.approx(3e-6, abs=1e-7)


def test_the_event_clock_moves_its_anchor_forward():
    events = {name: SimpleNamespace(t=t) for name, t in (("a", 0.0), ("b", 3600.0), ("c", 3600.00025))}
    ms = lambda x, y: float(np.float32((y.t - x.t) * 1e3))  # noqa: E731
    clock = EventClock(ms, events["a"])
    assert clock.at(events["b"]) == pytest.approx(3600.0, abs=1e-3)
    t_b, t_c = clock.at(events["b"]), clock.at(events["c"])
    assert t_c - t_b == pytest.approx(2.5e-4, abs=1e-7)  # relative positions come from the new anchor


def test_a_pool_on_another_device_than_the_process_is_refused():
    with pytest.raises(CopyError, match="sets its device once"):
        make(FakeGpu(device=1))


def test_a_missing_cupy_is_one_line_that_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` raises ImportError
    with pytest.raises(CopyError) as e:
        import_cupy("13.0")
    message = str(e.value)
    assert "\n" not in message and "make gpu" in message and "cupy-cuda13x" in message


def test_a_cupy_for_another_cuda_major_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", FakeGpu(runtime_version=12080).cupy)
    with pytest.raises(CopyError, match="built for CUDA 12 but torch for CUDA 13.0.*cupy-cuda13x"):
        import_cupy("13.0")
    assert import_cupy("12.8") is sys.modules["cupy"]


def test_a_pool_larger_than_the_shared_memory_says_what_to_change():
    gib = 2 ** 30
    check_shm_room(need=10 * gib, held=6 * gib, free=4 * gib, block_bytes=1 << 20)  # fits exactly
    with pytest.raises(CopyError, match=r"needs 10.00 GiB .* lower cache.num_host_blocks to 4096 or less.*shm_size"):
        check_shm_room(need=10 * gib, held=0, free=4 * gib, block_bytes=1 << 20)


def test_a_worker_waits_for_the_pool_a_bounded_time(tmp_path):
    t = [0.0]

    def sleep(s):
        t[0] += s
        if t[0] >= 0.2:
            (tmp_path / "pool").touch()  # the KV manager creates it a little later

    wait_for_segment("pool", 5.0, tmp_path, sleep, lambda: t[0])
    assert 0.2 <= t[0] < 0.3
    with pytest.raises(CopyError, match="did not appear .* cache.num_host_blocks=0"):
        wait_for_segment("other", 1.0, tmp_path, sleep, lambda: t[0])
