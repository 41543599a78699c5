"""The stage worker process: one ordered stream of StageBatch messages; swaps, then compute, then forward.

Copies run here, not in the KV manager: CUDA work from two processes is time-sliced, so only a copy
issued by the worker itself (on its own stream) can overlap the worker's kernels.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import sys
import time
from typing import Any

import numpy as np
import torch

from common import sockets
from common.config import worker_threads
from common.log import get_logger
from common.hostpool import HostPoolError
from common.liveness import Beacon, new_epoch
from common.messages import BatchResult, Ready, SampledTokens, StageBatch, SwapDone
from common.model.spec import ModelError
from kernels.attention import AttentionError
from workers.copy_executor import CopyError
from workers.copy_executor.startup import import_cupy, open_executor
from workers.model.batch import StepInput
from workers.model.logprobs import token_logprobs
from workers.model.runner import StageRunner, resolve_device
from workers.model.sampling import SamplingParams, sample_rows

ACK_POLL_S = 0.0005  # how often pending copies are polled while the stream is idle


def to_wire(hidden: torch.Tensor) -> np.ndarray:
    """Activations as a numpy array (bfloat16 travels as its raw 16-bit pattern)."""
    h = hidden.detach().contiguous().cpu()
    if h.dtype == torch.bfloat16:
        h = h.view(torch.int16)
    return h.numpy()


def from_wire(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(np.array(array))  # own the memory: the frame buffer is read-only
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def open_stage(config: Any, stage: int) -> tuple[StageRunner, Any | None]:
    """The stage's layers and its copy executor, everything that can fail checked before the worker is ready.

    The device is set once here, for torch and CuPy alike (no context ever lands on another GPU), CuPy is
    imported, and the host pool is mapped and page-locked; a missing dependency, an unusable GPU or a pool
    that cannot fit ends the process with one line that says what to change.
    """
    swaps = config.cache.num_host_blocks > 0 and config.cache.swap in ("proactive", "reactive")
    try:
        cupy = None
        if config.model.device == "cuda":
            device = resolve_device("cuda", stage, config.parallel.devices)
            torch.cuda.set_device(device)
            if swaps:
                cupy = import_cupy()
                cupy.cuda.Device(device.index).use()
        runner = StageRunner.from_config(config, stage)
        return runner, open_executor(config, stage, runner.kv, cupy) if swaps else None
    except (CopyError, ModelError, AttentionError, HostPoolError) as e:
        raise SystemExit(f"fastserve worker --stage {stage}: {e}") from None


class Carries:
    """Stage 0's record of what the last stage sampled, for the jobs a later batch carries.

    With overlapped scheduling a decode job may be in batch n+1 before n's token reached the scheduler:
    its input is the token n samples (`carry_from` = n). The last stage hands every batch's tokens to
    stage 0 (on one stage, itself), and stage 0 runs a batch once the tokens it carries are known. A
    carry that can never be known (the batch was lost to a restart, or failed) feeds token 0: the
    scheduler has ended or will rerun those jobs, and the row's output is never emitted.
    """

    KEEP = 256  # batches remembered; a carry names a batch at most a pipeline's depth old

    def __init__(self) -> None:
        self.tokens: collections.OrderedDict[int, dict[int, int]] = collections.OrderedDict()
        self.seen: collections.OrderedDict[int, None] = collections.OrderedDict()  # batches stage 0 ran

    def ran(self, batch_id: int) -> None:
        self.seen[batch_id] = None
        while len(self.seen) > self.KEEP:
            self.seen.popitem(last=False)

    def sampled(self, batch_id: int, job_ids: list[int], token_ids: list[int]) -> None:
        self.tokens[batch_id] = dict(zip(job_ids, token_ids))
        while len(self.tokens) > self.KEEP:
            self.tokens.popitem(last=False)

    def ready(self, msg: StageBatch, giving_up: bool) -> bool:
        """Whether every token the batch carries is known (or never will be)."""
        return giving_up or all(b < 0 or b in self.tokens or b not in self.seen for b in msg.carry_from)

    def fill(self, msg: StageBatch) -> np.ndarray:
        ids = np.array(msg.input_ids, dtype=np.int64)
        offsets = np.cumsum([0, *msg.num_new_tokens])
        for row, (job_id, b) in enumerate(zip(msg.job_ids, msg.carry_from)):
            if b >= 0:
                ids[offsets[row]] = max(self.tokens.get(b, {}).get(job_id, 0), 0)
        return ids


class StageWorker:
    """Layers [lo, hi) of one stage; the last stage samples and reports tokens to the scheduler."""

    def __init__(
        self,
        runner: StageRunner,
        stage: int,
        recv_inbox: Any,
        send_next: Any | None,
        send_to_scheduler: Any,
        send_to_kvcache: Any,
        send_to_control: Any | None = None,
        executor: Any | None = None,
        send_to_first: Any | None = None,
        beacon: tuple[str, float] = ("", 0.0),
    ) -> None:
        self.runner = runner
        self.epoch = new_epoch()
        address, period = beacon  # heartbeats to the scheduler, from a thread: a long batch never silences them
        self.beacon = Beacon("worker", stage, self.epoch, [address] if address else [], period)
        self.send_to_first = send_to_first  # the last stage of 2+ hands sampled tokens to stage 0
        self.carries = Carries() if stage == 0 else None
        self.stage = stage
        self.recv_inbox = recv_inbox
        self.send_next = send_next  # None on the last stage
        self.send_to_scheduler = send_to_scheduler
        self.send_to_kvcache = send_to_kvcache
        self.send_to_control = send_to_control
        self.executor = executor  # the copy executor, opened at start; None when this stack does not swap
        self.pending_ops = 0
        self.acks_reported = (0.0, 0.0)  # copy_s, overlap_s already sent
        self.log = get_logger()

    @classmethod
    def from_config(cls, config: Any, stage: int, ctx: Any | None = None) -> "StageWorker":
        if config.model.device == "cpu":
            torch.set_num_threads(worker_threads(config.parallel))
            # The CPU copy executor is a thread: hand it the GIL quickly, or a short copy waits out a
            # whole 5 ms switch interval behind the compute's Python code and runs after it.
            sys.setswitchinterval(0.0002)
        runner, executor = open_stage(config, stage)
        ctx = ctx or sockets.context()
        ep = config.endpoints
        last = stage == config.parallel.num_stages - 1
        return cls(
            runner,
            stage,
            recv_inbox=sockets.bind_inbox(ctx, ep.stage(stage), ep.bind_any),
            send_next=None if last else sockets.connect_push(ctx, ep.stage(stage + 1)),
            send_to_scheduler=sockets.connect_push(ctx, ep.scheduler),
            send_to_kvcache=sockets.connect_push(ctx, ep.kvcache),
            send_to_control=sockets.connect_push(ctx, ep.control) if ep.control else None,
            executor=executor,
            send_to_first=sockets.connect_push(ctx, ep.stage(0)) if last and stage > 0 else None,
            beacon=(ep.scheduler, config.liveness.heartbeat_s),
        )

    async def run(self) -> None:
        for sock in (self.send_to_scheduler, self.send_to_control):
            if sock is not None:
                await sockets.send(sock, Ready("worker", self.stage, self.epoch))
        self.log.info("worker_ready", layers=f"[{self.runner.lo},{self.runner.hi})", blocks=self.runner.num_blocks,
                      device=str(self.runner.device), dtype=str(self.runner.dtype).removeprefix("torch."),
                      attention=self.runner.attention.name, attention_fallback=self.runner.attention_fallback)
        self.beacon.start()
        acks = asyncio.ensure_future(self.ack_loop())
        waiting: collections.deque[StageBatch] = collections.deque()  # stage 0: batches awaiting carried tokens
        try:
            while True:
                msg = await sockets.recv_valid(self.recv_inbox, (StageBatch, SampledTokens), self.log)
                if isinstance(msg, SampledTokens):
                    if self.carries is None:
                        self.log.warning("sampled_tokens_dropped", batch_id=msg.batch_id, reason="not stage 0")
                    else:
                        self.carries.sampled(msg.batch_id, msg.job_ids, msg.token_ids)
                else:
                    waiting.append(msg)
                # A flush behind a waiting batch means a stage restarted: the tokens it waits for are lost.
                while waiting and (self.carries is None or self.carries.ready(waiting[0], any(m.flush for m in waiting))):
                    await self.on_batch(waiting.popleft())
        finally:
            acks.cancel()
            self.beacon.stop()

    async def on_batch(self, msg: StageBatch) -> None:
        self.log.debug("batch_received", batch_id=msg.batch_id, jobs=len(msg.job_ids), swaps_out=len(msg.swap_out),
                       swaps_in=len(msg.swap_in), t=time.time())
        if self.carries is not None:
            if msg.carry_from:
                msg = dataclasses.replace(msg, input_ids=self.carries.fill(msg))
            self.carries.ran(msg.batch_id)
        self.submit_swaps(msg)
        hidden, tokens, compute_s, error, failed, logprobs = None, [], msg.compute_s, "", {}, []
        if msg.job_ids:
            try:
                out, seconds = self.compute(msg)
                compute_s += seconds
                if self.runner.is_last:
                    tokens, failed = self.sample(msg, out)
                    logprobs = token_logprobs(out, tokens, msg.sampling.logprobs)
                else:
                    hidden = to_wire(out)
            except Exception as e:  # a bad batch fails its jobs, never the loop
                self.log.exception("batch_failed", batch_id=msg.batch_id)
                error = f"stage {self.stage}: {type(e).__name__}: {e}"
        if error or self.send_next is None:
            failed_ids = [msg.job_ids[row] for row in failed]
            if failed:
                self.log.error("sampling_failed", batch_id=msg.batch_id, job_ids=failed_ids, error=next(iter(failed.values())))
            result = BatchResult(msg.batch_id, [] if error else msg.job_ids, tokens, compute_s, error, failed_ids,
                                 next(iter(failed.values()), ""), [] if error else logprobs)
            if self.send_next is None:  # the last stage: stage 0 learns the tokens first (carries)
                if self.send_to_first is not None:
                    await sockets.send(self.send_to_first, SampledTokens(msg.batch_id, result.job_ids, tokens))
                elif self.carries is not None:
                    self.carries.sampled(msg.batch_id, result.job_ids, tokens)
            await sockets.send(self.send_to_scheduler, result)
            self.log.debug("batch_done", batch_id=msg.batch_id, compute_s=compute_s, t=time.time())
            if error and self.send_next is not None:  # later stages still run this batch's swaps
                empty = msg.sampling.select([])
                msg = StageBatch(msg.batch_id, [], [], [], [], empty, msg.swap_out, msg.swap_in, None, None, compute_s,
                                 msg.flush)
                await sockets.send(self.send_next, msg)
            await self.report_acks()
            return
        forward = dataclasses.replace(msg, input_ids=None, hidden=hidden, compute_s=compute_s)
        await sockets.send(self.send_next, forward)
        self.log.debug("batch_forwarded", batch_id=msg.batch_id, compute_s=compute_s, t=time.time())
        await self.report_acks()

    def submit_swaps(self, msg: StageBatch) -> None:
        if msg.flush and self.executor is not None:
            # A stage restarted and the KV manager wrote off every device block: copies still running
            # here must land before those blocks are handed to other jobs by the batches that follow.
            self.executor.flush()
        if not msg.swap_out and not msg.swap_in:
            return
        if self.executor is None:
            raise RuntimeError("swap ops arrived but this worker has no host pool (cache.num_host_blocks is 0)")
        for op in (*msg.swap_out, *msg.swap_in):
            self.executor.submit(op)
            self.pending_ops += 1

    def compute(self, msg: StageBatch) -> tuple[torch.Tensor, float]:
        runner = self.runner
        step = StepInput(
            job_ids=msg.job_ids,
            query_lens=msg.num_new_tokens,
            context_lens=msg.context_lens,
            block_tables=msg.block_tables,
            token_ids=torch.from_numpy(np.array(msg.input_ids)) if runner.is_first else None,
            hidden=None if runner.is_first else from_wire(msg.hidden, runner.dtype),
        )
        if self.executor is not None:
            self.executor.wait_for(step.job_ids)
            self.executor.compute_begin()
        start = time.perf_counter()
        try:
            out = runner.forward(step)
        finally:
            if self.executor is not None:
                self.executor.compute_end()
        if out.is_cuda:
            torch.cuda.current_stream(out.device).synchronize()
        return out, time.perf_counter() - start

    def sample(self, msg: StageBatch, logits: torch.Tensor) -> tuple[list[int], dict[int, str]]:
        c = msg.sampling
        params = [
            SamplingParams(max_tokens=1, temperature=t, top_k=k, top_p=p if p > 0 else 1.0, seed=seed)
            for t, k, p, seed in zip(c.temperature, c.top_k, c.top_p, c.seed)
        ]
        return sample_rows(logits, params, c.step)

    async def report_acks(self) -> None:
        if self.executor is None or not self.pending_ops:
            return
        done = self.executor.poll()
        if not done:
            return
        self.pending_ops -= len(done)
        stats = self.executor.stats()
        copy_s, overlap_s = stats.copy_s - self.acks_reported[0], stats.overlap_s - self.acks_reported[1]
        self.acks_reported = (stats.copy_s, stats.overlap_s)
        await sockets.send(self.send_to_kvcache, SwapDone(self.stage, done, max(copy_s, 0.0), max(overlap_s, 0.0)))

    async def ack_loop(self) -> None:
        """Acknowledge copies that finish while no batch arrives (a stream that carried only swaps)."""
        while True:
            await asyncio.sleep(ACK_POLL_S if self.pending_ops else 0.01)
            await self.report_acks()

    def close(self) -> None:
        if self.executor is not None:
            self.executor.close()
            stats = self.executor.stats()
            self.log.info("copy_stats", ops_out=stats.ops_out, ops_in=stats.ops_in, bytes_out=stats.bytes_out,
                          bytes_in=stats.bytes_in, copy_s=stats.copy_s, overlap_s=stats.overlap_s,
                          hidden_fraction=stats.hidden_fraction)
        for sock in (self.send_to_first, self.recv_inbox, self.send_next, self.send_to_scheduler, self.send_to_kvcache, self.send_to_control):
            if sock is not None:
                sock.close(linger=0)
