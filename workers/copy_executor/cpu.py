"""CPU copy executor: ops run in order on one background thread, overlapping the compute thread."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import Any

import torch

from kernels.block_copy import copy_blocks
from workers.copy_executor.base import CopyError, CopyExecutor
from workers.copy_executor.overlap import COMPUTE, COPY, CopyStats, OverlapMeter


class CpuCopyExecutor(CopyExecutor):
    """Same interface as the CUDA backend; wait_for blocks the caller, as CPU compute has no stream."""

    def __init__(
        self, device_pool: torch.Tensor, host_pool: torch.Tensor, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        super().__init__(device_pool, host_pool)
        self._clock = clock
        self._cv = threading.Condition()
        self._queue: deque[tuple[Any, str, list[int], list[int]]] = deque()
        self._pending_jobs: Counter[Any] = Counter()  # job -> ops submitted, not yet done
        self._done: list[int] = []
        self._meter = OverlapMeter()
        self._counts = Counter()
        self._compute_start: float | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="copy-executor", daemon=True)
        self._thread.start()

    def submit(self, op: Any) -> None:
        direction, src, dst = self.check(op)
        with self._cv:
            self._raise_if_broken()
            if self._closed:
                raise CopyError("the copy executor is closed")
            self._queue.append((op, direction, src, dst))
            self._pending_jobs[op.job_id] += 1
            self._cv.notify_all()

    def poll(self) -> list[int]:
        with self._cv:
            self._raise_if_broken()
            done, self._done = self._done, []
            return done

    def wait_for(self, job_ids: Iterable[Any], timeout: float | None = None) -> None:
        jobs = list(job_ids)
        with self._cv:
            ok = self._cv.wait_for(lambda: self._error or not any(self._pending_jobs[j] for j in jobs), timeout)
            self._raise_if_broken()
            if not ok:
                raise CopyError(f"copies of jobs {jobs} did not finish within {timeout} s")

    def compute_begin(self) -> None:
        with self._cv:
            if self._compute_start is not None:
                raise CopyError("compute_begin called twice without compute_end")
            self._compute_start = self._clock()
            self._meter.begin(COMPUTE)

    def compute_end(self) -> None:
        with self._cv:
            if self._compute_start is None:
                raise CopyError("compute_end called without compute_begin")
            self._meter.add(COMPUTE, self._compute_start, self._clock())
            self._compute_start = None

    def flush(self, timeout: float | None = None) -> None:
        with self._cv:
            ok = self._cv.wait_for(lambda: self._error or not self._queue, timeout)
            self._raise_if_broken()
            if not ok:
                raise CopyError(f"{len(self._queue)} copy op(s) still queued after {timeout} s")

    def stats(self) -> CopyStats:
        with self._cv:
            c, m = self._counts, self._meter
            return CopyStats(
                c["ops_out"], c["ops_in"], c["bytes_out"], c["bytes_in"], m.busy_s[COPY], m.busy_s[COMPUTE], m.overlap_s
            )

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join()
        self._raise_if_broken()

    # ---- the copy thread -----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    self._cv.wait_for(lambda: self._queue or self._closed)
                    if not self._queue:
                        return  # closed and drained
                    op, direction, src, dst = self._queue[0]  # stays queued (flush waits) until copied
                    self._meter.begin(COPY)
                start = self._clock()
                if direction == "out":
                    copy_blocks(self.device_pool, self.host_pool, src, dst)
                else:
                    copy_blocks(self.host_pool, self.device_pool, src, dst)
                end = self._clock()
                with self._cv:
                    self._queue.popleft()
                    self._meter.add(COPY, start, end)
                    self._pending_jobs[op.job_id] -= 1
                    if not self._pending_jobs[op.job_id]:
                        del self._pending_jobs[op.job_id]
                    self._counts[f"ops_{direction}"] += 1
                    self._counts[f"bytes_{direction}"] += len(src) * self.block_bytes
                    self._done.append(op.op_id)
                    self._cv.notify_all()
        except BaseException as e:  # thread boundary: hand the failure to the worker's next call
            with self._cv:
                self._error = e
                self._cv.notify_all()

    def _raise_if_broken(self) -> None:
        if self._error is not None:
            raise CopyError(f"the copy thread failed: {self._error!r}") from self._error
