"""The KV books: per-job block tables on device and host, residency, and the copies in flight."""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field

from services.kvcache.allocator import BlockAllocator

JobId = Hashable


class Residency(enum.IntEnum):
    """Where a job's KV lives. Resident first; DROPPED (no KV anywhere) last."""

    DEVICE = 0  # in the device pool; may run
    SWAPPING_IN = 1  # host -> device copy in flight; device blocks reserved, host blocks still held
    SWAPPING_OUT = 2  # device -> host copy in flight; both held until the copy is acknowledged
    HOST = 3  # only in the host pool; must be uploaded before it runs
    DROPPED = 4  # discarded; the job redoes prefill over prompt + generated tokens


class Direction(str, enum.Enum):
    OUT = "out"  # device -> host (offload)
    IN = "in"  # host -> device (upload)


@dataclass(frozen=True)
class SwapOp:
    """One job's copy between pools; every stage runs it on its own slice of both pools."""

    op_id: int
    job_id: JobId
    direction: Direction
    pairs: tuple[tuple[int, int], ...]  # (src_block, dst_block); src is a device block for OUT, host for IN

    @property
    def src_blocks(self) -> tuple[int, ...]:
        return tuple(s for s, _ in self.pairs)

    @property
    def dst_blocks(self) -> tuple[int, ...]:
        return tuple(d for _, d in self.pairs)


@dataclass
class JobBlocks:
    """Mutable record of one job; owned by KVBooks, read-only to everyone else."""

    job_id: JobId
    state: Residency
    num_tokens: int  # tokens whose KV the blocks hold (after the last planned step)
    device: list[int] = field(default_factory=list)  # block table in the device pool
    host: list[int] = field(default_factory=list)  # blocks in the host pool
    host_tokens: int = 0  # tokens whose KV the host blocks hold
    op_id: int | None = None  # the copy in flight, if any
    freed: bool = False  # finished or cancelled while its copy was in flight


@dataclass
class _Pending:
    op: SwapOp
    entry: JobBlocks
    acked: set[int] = field(default_factory=set)  # stages that acknowledged


class KVBooks:
    """Stage-agnostic bookkeeping: every stage has the same block ids, so one table serves all."""

    def __init__(self, num_device_blocks: int, num_host_blocks: int, block_size: int, num_stages: int = 1,
                 first_op_id: int = 0) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, not {block_size}")
        if num_stages <= 0:
            raise ValueError(f"num_stages must be > 0, not {num_stages}")
        self.device = BlockAllocator(num_device_blocks)
        self.host = BlockAllocator(num_host_blocks)
        self.block_size = block_size
        self.num_stages = num_stages
        self._jobs: dict[JobId, JobBlocks] = {}
        self._resident: dict[JobId, None] = {}  # jobs in DEVICE state (the offload candidates), kept in step
        self._pending: dict[int, _Pending] = {}
        self._cancelled: set[int] = set()
        self._next_op = first_op_id  # ids of copies; a later start continues past every earlier one
        self.releasing = 0  # device blocks that become free when pending copies are acknowledged
        self.counters = dict(swaps_out=0, swaps_in=0, blocks_out=0, blocks_in=0, dropped=0, ops_cancelled=0)

    # ---- queries -------------------------------------------------------------------------------
    @property
    def next_op_id(self) -> int:
        return self._next_op

    @property
    def num_jobs(self) -> int:
        return len(self._jobs)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get(self, job_id: JobId) -> JobBlocks | None:
        return self._jobs.get(job_id)

    def state(self, job_id: JobId) -> Residency | None:
        entry = self._jobs.get(job_id)
        return entry.state if entry else None

    def block_table(self, job_id: JobId) -> tuple[int, ...]:
        return tuple(self._jobs[job_id].device)

    def jobs(self) -> Iterator[JobBlocks]:
        return iter(self._jobs.values())

    def resident(self) -> list[JobId]:
        """Jobs in DEVICE state."""
        return list(self._resident)

    def pending_ops(self) -> tuple[int, ...]:
        return tuple(self._pending)

    def residency_counts(self) -> Counter[Residency]:
        """Live jobs by where their KV is now (one pass over the books: for stats, not the iteration)."""
        return Counter(entry.state for entry in self._jobs.values())

    def extra_blocks(self, job_id: JobId, num_tokens: int) -> int:
        """Device blocks a DEVICE/new/DROPPED job still needs to hold num_tokens."""
        entry = self._jobs.get(job_id)
        held = len(entry.device) if entry and entry.state in (Residency.DEVICE, Residency.SWAPPING_IN) else 0
        return max(0, self.blocks_for(num_tokens) - held)

    # ---- transitions ---------------------------------------------------------------------------
    def grow_within(self, job_id: JobId, num_tokens: int) -> tuple[int, ...] | None:
        """A device-resident job's step that stays within its blocks (a decode step, most of them):
        recorded, and its block table returned; None for any other step (nothing changes)."""
        entry = self._jobs.get(job_id)
        if entry is not None and self._within(entry, num_tokens):
            entry.num_tokens = num_tokens
            return tuple(entry.device)
        return None

    def _within(self, entry: JobBlocks, num_tokens: int) -> bool:
        """A device-resident job growing to num_tokens inside the blocks it holds: no allocation."""
        return entry.state is Residency.DEVICE and entry.num_tokens <= num_tokens <= len(entry.device) * self.block_size

    def grow(self, job_id: JobId, num_tokens: int) -> bool:
        """Give a new, dropped or device-side job blocks for num_tokens; False (nothing taken) if short."""
        entry = self._jobs.get(job_id)
        if entry is not None and self._within(entry, num_tokens):  # a decode step within its last block
            entry.num_tokens = num_tokens
            return True
        if entry is None or entry.state is Residency.DROPPED:
            entry = JobBlocks(job_id, Residency.DEVICE, 0)
        elif entry.state not in (Residency.DEVICE, Residency.SWAPPING_IN):
            raise ValueError(f"job {job_id!r} is {entry.state.name}; only device-side jobs can grow")
        if num_tokens < entry.num_tokens:
            raise ValueError(f"job {job_id!r} holds {entry.num_tokens} tokens; it cannot shrink to {num_tokens}")
        ids = self.device.try_allocate(max(0, self.blocks_for(num_tokens) - len(entry.device)))
        if ids is None:
            return False
        entry.device.extend(ids)
        entry.num_tokens = num_tokens
        self._jobs[job_id] = entry
        if entry.state is Residency.DEVICE:
            self._resident[job_id] = None
        return True

    def swap_out(self, job_id: JobId) -> SwapOp | None:
        """Start offloading a DEVICE job; None when the host pool lacks room (nothing changes)."""
        entry = self._require(job_id, Residency.DEVICE)
        # Only blocks holding KV travel; room reserved by an upload for a step not yet run does not.
        host = self.host.try_allocate(min(len(entry.device), self.blocks_for(entry.num_tokens)))
        if host is None:
            return None
        entry.host, entry.host_tokens = host, entry.num_tokens
        entry.state = Residency.SWAPPING_OUT
        del self._resident[job_id]
        self.releasing += len(entry.device)
        self.counters["swaps_out"] += 1
        self.counters["blocks_out"] += len(host)
        return self._start(entry, Direction.OUT, tuple(zip(entry.device, host)))

    def swap_in(self, job_id: JobId, num_tokens: int = 0) -> SwapOp | None:
        """Start uploading a HOST job into fresh device blocks (room for num_tokens); None when short."""
        entry = self._require(job_id, Residency.HOST)
        if num_tokens and num_tokens < entry.num_tokens:
            raise ValueError(f"job {job_id!r} holds {entry.num_tokens} tokens; it cannot shrink to {num_tokens}")
        device = self.device.try_allocate(max(len(entry.host), self.blocks_for(num_tokens)))
        if device is None:
            return None
        entry.device = device  # num_tokens stays: the extra room holds nothing until the job runs
        entry.state = Residency.SWAPPING_IN
        self.counters["swaps_in"] += 1
        self.counters["blocks_in"] += len(entry.host)
        return self._start(entry, Direction.IN, tuple(zip(entry.host, device)))

    def drop(self, job_id: JobId) -> None:
        """Discard a DEVICE job's KV at once (it is in no batch in flight, so nothing reads the blocks)."""
        entry = self._require(job_id, Residency.DEVICE)
        self.device.free(entry.device)
        entry.device, entry.num_tokens = [], 0
        entry.state = Residency.DROPPED
        del self._resident[job_id]
        self.counters["dropped"] += 1

    def ack(self, op_id: int, stage: int = 0) -> bool:
        """A stage finished its part of a copy. True when that completed the op (all stages acked)."""
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage {stage} is out of range for {self.num_stages} stage(s)")
        pending = self._pending.get(op_id)
        if pending is None:
            if op_id in self._cancelled:
                return False  # the copy was written off by device_lost(); a late ack changes nothing
            raise KeyError(f"no copy op {op_id} is in flight")
        pending.acked.add(stage)
        if len(pending.acked) < self.num_stages:
            return False
        del self._pending[op_id]
        entry = pending.entry
        entry.op_id = None
        if pending.op.direction is Direction.OUT or entry.freed:
            self.releasing -= len(entry.device)
        if pending.op.direction is Direction.OUT:
            self.device.free(entry.device)
            entry.device, entry.state = [], Residency.HOST
        else:
            self.host.free(entry.host)
            entry.host, entry.state = [], Residency.DEVICE
            if not entry.freed:
                self._resident[entry.job_id] = None
        if entry.freed:
            self._release(entry)
        return True

    def free(self, job_id: JobId) -> bool:
        """Forget a finished or cancelled job. Blocks under a copy in flight are released at its ack."""
        entry = self._jobs.pop(job_id, None)
        if entry is None:
            return False
        self._resident.pop(job_id, None)
        if entry.op_id is None:
            self._release(entry)
        else:
            entry.freed = True
            if entry.state is Residency.SWAPPING_IN:
                self.releasing += len(entry.device)
        return True

    def device_lost(self) -> tuple[JobId, ...]:
        """A worker lost its device pool: write off copies in flight, drop device-side KV.

        Host copies survive (the pool is the manager's shared memory): finished offloads stay HOST, and
        an upload in flight falls back to HOST. An offload in flight may be partial, so that job is
        dropped. Returns the live jobs that must redo prefill."""
        for op_id, pending in self._pending.items():
            entry = pending.entry
            self._cancelled.add(op_id)
            self.counters["ops_cancelled"] += 1
            self.device.free(entry.device)
            entry.device, entry.op_id = [], None
            if pending.op.direction is Direction.OUT or entry.freed:
                self.host.free(entry.host)
                entry.host, entry.state = [], Residency.DROPPED
            else:
                # Steps run since the upload (reactive runs during it) are lost with the device pool.
                entry.state, entry.num_tokens = Residency.HOST, entry.host_tokens
        self._pending.clear()
        self._resident.clear()
        self.releasing = 0
        dropped: list[JobId] = []
        for entry in self._jobs.values():
            if entry.state is Residency.DEVICE:
                self.device.free(entry.device)
                entry.device, entry.state = [], Residency.DROPPED
            if entry.state is Residency.DROPPED and entry.num_tokens:
                dropped.append(entry.job_id)
                entry.num_tokens = 0  # nothing held any more; also keeps a later call from reporting it again
                self.counters["dropped"] += 1
        return tuple(dropped)

    def is_whole(self) -> bool:
        """Both pools entirely free and no copy in flight."""
        return self.device.is_whole() and self.host.is_whole() and not self._pending

    # ---- internals -----------------------------------------------------------------------------
    def _require(self, job_id: JobId, state: Residency) -> JobBlocks:
        entry = self._jobs.get(job_id)
        if entry is None or entry.state is not state:
            found = entry.state.name if entry else "unknown"
            raise ValueError(f"job {job_id!r} is {found}; this needs it {state.name}")
        return entry

    def _start(self, entry: JobBlocks, direction: Direction, pairs: tuple[tuple[int, int], ...]) -> SwapOp:
        op = SwapOp(self._next_op, entry.job_id, direction, pairs)
        self._next_op += 1
        entry.op_id = op.op_id
        self._pending[op.op_id] = _Pending(op, entry)
        return op

    def _release(self, entry: JobBlocks) -> None:
        self.device.free(entry.device)
        self.host.free(entry.host)
        entry.device, entry.host = [], []
