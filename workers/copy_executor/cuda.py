"""CUDA copy executor: a dedicated CuPy stream, page-locked host pool, one event per op.

Design note: the host never waits in the serving loop. The compute stream waits on the copy events of
the jobs it is about to run (a device-side wait), and poll() only queries events. Copy and compute
intervals are read from CUDA events against one reference event, so the overlap is measured on the
GPU's own timeline.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from workers.copy_executor.base import CopyError, CopyExecutor, block_runs
from workers.copy_executor.overlap import COMPUTE, COPY, CopyStats, OverlapMeter

_ALREADY_REGISTERED = 712  # cudaErrorHostMemoryAlreadyRegistered


@dataclass
class _InFlight:
    op_id: int
    job_id: Any
    direction: str
    nbytes: int
    start: Any  # cupy.cuda.Event
    end: Any  # cupy.cuda.Event; the op is acked once it has completed


class CudaCopyExecutor(CopyExecutor):
    """Swap ops on their own stream; compute_stream (default: torch's current stream) waits per job."""

    def __init__(self, device_pool: torch.Tensor, host_pool: torch.Tensor, compute_stream: Any = None) -> None:
        import cupy  # lazily: only CUDA workers need CuPy

        super().__init__(device_pool, host_pool)
        if device_pool.device.type != "cuda" or host_pool.device.type != "cpu":
            raise CopyError("the CUDA executor needs a CUDA device pool and a CPU host pool")
        self._cp = cupy
        self._device = cupy.cuda.Device(device_pool.device.index or 0)
        torch_stream = compute_stream or torch.cuda.current_stream(device_pool.device)
        host_bytes = host_pool.numel() * host_pool.element_size()
        with self._device:
            self._copy = cupy.cuda.Stream(non_blocking=True)
            self._compute = cupy.cuda.ExternalStream(torch_stream.cuda_stream)
            self._registered = self._pin(host_pool.data_ptr(), host_bytes)
            self._ref = cupy.cuda.Event()
            self._ref.record(self._copy)
            self._ref.synchronize()
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
                raise CopyError(f"cudaHostRegister of the host pool failed: {e}") from e
            return False
        return True

    def submit(self, op: Any) -> None:
        direction, src, dst = self.check(op)
        rt = self._cp.cuda.runtime
        if direction == "out":
            src_base, dst_base, kind = self.device_pool.data_ptr(), self.host_pool.data_ptr(), rt.memcpyDeviceToHost
        else:
            src_base, dst_base, kind = self.host_pool.data_ptr(), self.device_pool.data_ptr(), rt.memcpyHostToDevice
        size = self.block_bytes
        with self._device:
            if direction == "out":
                # The blocks were last written by compute; order the read after everything queued there.
                written = self._cp.cuda.Event(disable_timing=True)
                written.record(self._compute)
                self._copy.wait_event(written)
            start, end = self._cp.cuda.Event(), self._cp.cuda.Event()
            start.record(self._copy)
            for s, d, n in block_runs(src, dst):
                rt.memcpyAsync(dst_base + d * size, src_base + s * size, n * size, kind, self._copy.ptr)
            end.record(self._copy)
        self._meter.begin(COPY)
        self._in_flight.append(_InFlight(op.op_id, op.job_id, direction, len(src) * size, start, end))
        self._by_job.setdefault(op.job_id, []).append(end)

    def wait_for(self, job_ids: Iterable[Any]) -> None:
        with self._device:
            for job in job_ids:
                for event in self._by_job.get(job, ()):
                    self._compute.wait_event(event)

    def compute_begin(self) -> None:
        if self._compute_begin is not None:
            raise CopyError("compute_begin called twice without compute_end")
        with self._device:
            self._compute_begin = self._cp.cuda.Event()
            self._compute_begin.record(self._compute)
        self._meter.begin(COMPUTE)

    def compute_end(self) -> None:
        if self._compute_begin is None:
            raise CopyError("compute_end called without compute_begin")
        with self._device:
            end = self._cp.cuda.Event()
            end.record(self._compute)
        self._computes.append((self._compute_begin, end))
        self._compute_begin = None

    def poll(self) -> list[int]:
        done: list[int] = []
        self._measure_compute()
        while self._in_flight and self._in_flight[0].end.done:
            op = self._in_flight.popleft()
            self._meter.add(COPY, self._at(op.start), self._at(op.end), still_open=bool(self._in_flight))
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
            self._meter.add(COMPUTE, self._at(begin), self._at(end), still_open=still)

    def _at(self, event: Any) -> float:
        """Seconds from the reference event on the GPU timeline."""
        return self._cp.cuda.get_elapsed_time(self._ref, event) / 1e3

    def flush(self) -> None:
        with self._device:
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
            with self._device:
                self._cp.cuda.runtime.hostUnregister(self.host_pool.data_ptr())
            self._registered = False
