"""CUDA copy executor: a dedicated CuPy stream, page-locked host pool, one event per op.

Design note: the host never waits in the serving loop. Every op first makes the copy stream wait for
the work already queued on the compute stream: an offload must read blocks after the kernels that wrote
them, and an upload must not overwrite reused blocks that queued kernels still read. The compute stream
waits on the copy events of the jobs it is about to run (a device-side wait), and poll() only queries
events. Each interval is timed by its own start and end events (exact at any uptime); its position,
needed to intersect copies with compute, is read against an anchor event that moves forward, so the
float32 milliseconds CUDA reports never span more than about a second.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from workers.copy_executor.base import CopyError, CopyExecutor, block_runs
from workers.copy_executor.overlap import COMPUTE, COPY, CopyStats, OverlapMeter

_ALREADY_REGISTERED = 712  # cudaErrorHostMemoryAlreadyRegistered
REANCHOR_MS = 1000.0  # positions are read against an anchor at most this far back


@dataclass
class _InFlight:
    op_id: int
    job_id: Any
    direction: str
    nbytes: int
    start: Any  # cupy.cuda.Event
    end: Any  # cupy.cuda.Event; the op is acked once it has completed


class EventClock:
    """Seconds on the GPU timeline of completed events, from float32 ms elapsed times that never span long."""

    def __init__(self, elapsed_ms: Callable[[Any, Any], float], anchor: Any) -> None:
        self._elapsed_ms, self._anchor, self._anchor_s = elapsed_ms, anchor, 0.0

    def at(self, event: Any) -> float:
        ms = self._elapsed_ms(self._anchor, event)
        t = self._anchor_s + ms / 1e3
        if ms > REANCHOR_MS:
            self._anchor, self._anchor_s = event, t
        return t

    def interval(self, start: Any, end: Any) -> tuple[float, float]:
        """(start, end) seconds; the length comes from the interval's own two events."""
        t0 = self.at(start)
        return t0, t0 + self._elapsed_ms(start, end) / 1e3


class CudaCopyExecutor(CopyExecutor):
    """Swap ops on their own stream; compute_stream (default: torch's current stream) waits per job.

    The worker sets its CUDA device once at start; the executor runs on that device and refuses a pool
    on another one. `cupy` is the CuPy module (tests pass a stand-in).
    """

    def __init__(self, device_pool: torch.Tensor, host_pool: torch.Tensor, compute_stream: Any = None,
                 cupy: Any = None) -> None:
        if cupy is None:
            from workers.copy_executor.startup import import_cupy

            cupy = import_cupy()
        super().__init__(device_pool, host_pool)
        if host_pool.device.type != "cpu":
            raise CopyError("the CUDA executor needs its host pool in host memory")
        self._cp = cupy
        index = device_pool.device.index or 0
        current = cupy.cuda.runtime.getDevice()
        if current != index:
            raise CopyError(f"the device pool is on cuda:{index} but this process runs on cuda:{current}; "
                            "the worker sets its device once at start")
        torch_stream = compute_stream or torch.cuda.current_stream(device_pool.device)
        self._copy = cupy.cuda.Stream(non_blocking=True)
        self._compute = cupy.cuda.ExternalStream(torch_stream.cuda_stream, index)
        self._registered = self._pin(host_pool.data_ptr(), host_pool.numel() * host_pool.element_size())
        anchor = cupy.cuda.Event()
        anchor.record(self._copy)
        anchor.synchronize()
        self._clock = EventClock(cupy.cuda.get_elapsed_time, anchor)
        self._in_flight: deque[_InFlight] = deque()
        self._by_job: dict[Any, list[Any]] = {}  # job -> end events of its ops not yet acked
        self._computes: deque[tuple[Any, Any]] = deque()  # (begin, end) events not yet measured
        self._compute_begin: Any = None
        self._meter = OverlapMeter()
        self._counts = dict(ops_out=0, ops_in=0, bytes_out=0, bytes_in=0)

    def _pin(self, ptr: int, nbytes: int) -> bool:
        """Page-lock the host pool so copies are true async DMA; False if it already was (not ours)."""
        if nbytes == 0:
            return False
        try:
            self._cp.cuda.runtime.hostRegister(ptr, nbytes, 0)
        except self._cp.cuda.runtime.CUDARuntimeError as e:
            if getattr(e, "status", None) != _ALREADY_REGISTERED:
                raise CopyError(f"cudaHostRegister of the host pool ({nbytes / 2**30:.2f} GiB) failed: {e}") from e
            return False
        return True

    def submit(self, op: Any) -> None:
        direction, src, dst = self.check(op)
        rt, cuda = self._cp.cuda.runtime, self._cp.cuda
        if direction == "out":
            src_base, dst_base, kind = self.device_pool.data_ptr(), self.host_pool.data_ptr(), rt.memcpyDeviceToHost
        else:
            src_base, dst_base, kind = self.host_pool.data_ptr(), self.device_pool.data_ptr(), rt.memcpyHostToDevice
        size = self.block_bytes
        queued = cuda.Event(disable_timing=True)  # everything compute has queued so far, in both directions
        queued.record(self._compute)
        self._copy.wait_event(queued)
        start, end = cuda.Event(), cuda.Event()
        start.record(self._copy)
        for s, d, n in block_runs(src, dst):
            rt.memcpyAsync(dst_base + d * size, src_base + s * size, n * size, kind, self._copy.ptr)
        end.record(self._copy)
        self._meter.begin(COPY)
        self._in_flight.append(_InFlight(op.op_id, op.job_id, direction, len(src) * size, start, end))
        self._by_job.setdefault(op.job_id, []).append(end)

    def wait_for(self, job_ids: Iterable[Any]) -> None:
        for job in job_ids:
            for event in self._by_job.get(job, ()):
                self._compute.wait_event(event)

    def compute_begin(self) -> None:
        if self._compute_begin is not None:
            raise CopyError("compute_begin called twice without compute_end")
        self._compute_begin = self._cp.cuda.Event()
        self._compute_begin.record(self._compute)
        self._meter.begin(COMPUTE)

    def compute_end(self) -> None:
        if self._compute_begin is None:
            raise CopyError("compute_end called without compute_begin")
        end = self._cp.cuda.Event()
        end.record(self._compute)
        self._computes.append((self._compute_begin, end))
        self._compute_begin = None

    def poll(self) -> list[int]:
        done: list[int] = []
        self._measure_compute()
        while self._in_flight and self._in_flight[0].end.done:
            op = self._in_flight.popleft()
            self._meter.add(COPY, *self._clock.interval(op.start, op.end), still_open=bool(self._in_flight))
            events = self._by_job[op.job_id]
            events.remove(op.end)
            if not events:
                del self._by_job[op.job_id]
            self._counts[f"ops_{op.direction}"] += 1
            self._counts[f"bytes_{op.direction}"] += op.nbytes
            done.append(op.op_id)
        return done

    def _measure_compute(self) -> None:
        while self._computes and self._computes[0][1].done:
            begin, end = self._computes.popleft()
            still = bool(self._computes) or self._compute_begin is not None
            self._meter.add(COMPUTE, *self._clock.interval(begin, end), still_open=still)

    def flush(self) -> None:
        self._copy.synchronize()

    def stats(self) -> CopyStats:
        self.poll()
        c, m = self._counts, self._meter
        return CopyStats(
            c["ops_out"], c["ops_in"], c["bytes_out"], c["bytes_in"], m.busy_s[COPY], m.busy_s[COMPUTE], m.overlap_s
        )

    def close(self) -> None:
        self.flush()
        if self._registered:
            self._cp.cuda.runtime.hostUnregister(self.host_pool.data_ptr())
            self._registered = False
