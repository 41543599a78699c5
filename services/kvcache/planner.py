"""Per-iteration KV plan: which picked jobs run, with which blocks, and which copies or drops happen.

Design note: the planner only decides; copies run in the stage workers and come back as acks. A block
whose copy is in flight is never handed out again before its ack, and a job whose blocks are moving is
never in a batch, with two exceptions that make compute wait for the copy: `reactive` (the baseline) and a
proactive upload still in flight when its job is picked (`upload_wait`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.kvcache.books import JobId, KVBooks, Residency, SwapOp

MODES = ("proactive", "reactive", "recompute", "defer")
_UNRANKED = float("inf")  # jobs missing from the run order count as running last


@dataclass(frozen=True)
class Plan:
    """The answer for one iteration."""

    block_tables: Mapping[JobId, tuple[int, ...]]  # jobs that run now, in batch order -> device block ids
    held: tuple[JobId, ...] = ()  # picked jobs that skip this iteration
    swap_out: tuple[SwapOp, ...] = ()  # device -> host, ordered before swap_in and the compute
    swap_in: tuple[SwapOp, ...] = ()  # host -> device
    dropped: tuple[JobId, ...] = ()  # KV discarded: redo prefill over prompt + generated tokens when resumed

    @property
    def run(self) -> tuple[JobId, ...]:
        return tuple(self.block_tables)


@dataclass(frozen=True)
class StepPlan:
    """A plan for one scheduler step, by row: which rows run, and what the scheduler must hear back."""

    rows: tuple[int, ...]  # indices into the step's job columns of the jobs that run, in order
    plan: Plan
    held: tuple[JobId, ...]  # stale picks first (KV dropped since they were picked), then the plan's holds
    free_blocks: int  # device blocks free after the plan
    copies_in_flight: int  # swap ops not yet acknowledged by every stage


def cut_rows(input_ids: Any, num_new_tokens: Sequence[int], rows: Sequence[int]) -> Any:
    """The new tokens of the given rows, concatenated (the input of the jobs that run)."""
    if len(rows) == len(num_new_tokens):
        return input_ids
    offsets = np.cumsum([0, *num_new_tokens])
    return np.concatenate([input_ids[offsets[i] : offsets[i + 1]] for i in rows] or [input_ids[:0]])


@dataclass
class _Step:
    """Scratch state of one plan() call."""

    batch: dict[JobId, int]
    order: list[JobId]  # the run order as given
    rank: dict[JobId, int]
    protected: set[JobId]  # in this batch or in a batch in flight: never offloaded or dropped
    in_flight: set[JobId]
    tables: dict[JobId, tuple[int, ...]] = field(default_factory=dict)
    held: list[JobId] = field(default_factory=list)
    short: int = 0  # device blocks that picked jobs lacked for their new tokens
    waiting: int = 0  # device blocks that picked jobs sitting in the host pool need to come back
    swap_out: list[SwapOp] = field(default_factory=list)
    swap_in: list[SwapOp] = field(default_factory=list)
    dropped: list[JobId] = field(default_factory=list)

    def plan(self) -> Plan:
        return Plan(dict(self.tables), tuple(self.held), tuple(self.swap_out), tuple(self.swap_in), tuple(self.dropped))


class Planner:
    """Swap policy over KVBooks; clock-free, so the simulator drives it with modelled time."""

    def __init__(self, books: KVBooks, mode: str = "proactive", headroom_blocks: int = 8, max_jobs: int = 16,
                 upload_wait: bool = True) -> None:
        if mode not in MODES:
            raise ValueError(f"swap mode is {mode!r}; use one of {', '.join(MODES)}")
        if not 0 <= headroom_blocks < max(1, books.device.num_blocks):
            raise ValueError(f"headroom_blocks must be >= 0 and below the {books.device.num_blocks} device blocks")
        if max_jobs <= 0:
            raise ValueError(f"max_jobs must be > 0, not {max_jobs}")
        self.books = books
        self.mode = mode
        self.headroom = headroom_blocks
        self.max_jobs = max_jobs
        self.upload_wait = upload_wait
        self._counts = dict(iterations=0, held=0, offload_iterations=0, upload_iterations=0)

    @classmethod
    def from_config(cls, config: Any) -> "Planner":
        """Planner over fresh books sized by a common.config.Config."""
        cache = config.cache
        books = KVBooks(cache.num_gpu_blocks, cache.num_host_blocks, cache.block_size, config.parallel.num_stages)
        return cls(books, cache.swap, cache.headroom_blocks, config.scheduler.max_jobs, cache.upload_wait)

    # ---- the iteration -------------------------------------------------------------------------
    def plan_step(self, freed: Iterable[JobId], job_ids: Sequence[JobId], context_lens: Sequence[int],
                  num_new_tokens: Sequence[int], run_order: Sequence[JobId] = (),
                  in_flight: Collection[JobId] = ()) -> StepPlan:
        """One scheduler step as the KV manager and the simulator both take it: free the ended jobs,
        skip stale picks, plan the rest.

        A pick is stale when the context the scheduler saw differs from the KV the books hold: the job's
        KV was dropped (recompute mode, a lost device pool) after it was picked. It is held; the scheduler
        has learned of the drop and resends it as a recompute.
        """
        for job_id in freed:
            self.free(job_id)
        stale, wanted = [], {}
        for job_id, context_len, n in zip(job_ids, context_lens, num_new_tokens):
            entry = self.books.get(job_id)
            held_tokens = 0 if entry is None or entry.state is Residency.DROPPED else entry.num_tokens
            if context_len != held_tokens:
                stale.append(job_id)
            else:
                wanted[job_id] = context_len + n
        plan = self.plan(wanted, run_order, in_flight)
        tables = plan.block_tables
        rows = tuple(range(len(job_ids))) if len(tables) == len(job_ids) else \
            tuple(i for i, job_id in enumerate(job_ids) if job_id in tables)  # (ids are unique: every job runs)
        return StepPlan(rows, plan, (*stale, *plan.held), self.books.device.num_free, len(self.books.pending_ops()))

    def plan(
        self,
        batch: Mapping[JobId, int] | Iterable[tuple[JobId, int]],
        run_order: Sequence[JobId] = (),
        in_flight: Collection[JobId] = (),
    ) -> Plan:
        """batch: picked jobs -> tokens each holds after this step; run_order: live jobs, soonest first;
        in_flight: jobs in batches not yet back from the last stage."""
        step = self._step(batch, run_order, in_flight)
        {"proactive": self._proactive, "reactive": self._reactive, "recompute": self._recompute, "defer": self._defer}[
            self.mode
        ](step)
        if self.mode != "defer" and self._stalled(step):
            self._yield_to_first(step)
        self._counts["iterations"] += 1
        self._counts["held"] += len(step.held)
        self._counts["offload_iterations"] += bool(step.swap_out)
        self._counts["upload_iterations"] += bool(step.swap_in)
        return step.plan()

    def _proactive(self, step: _Step) -> None:
        books = self.books
        for job, tokens in self._undecided(step):
            state = books.state(job)
            if state in (None, Residency.DROPPED, Residency.DEVICE):
                self._grow_or_hold(step, job, tokens)
            elif state is Residency.SWAPPING_IN and self.upload_wait:
                # Its upload started an iteration or more ago, so what is left of the copy costs less
                # than skipping the iteration: it runs, and the stage's compute waits for the copy.
                self._grow_or_hold(step, job, tokens)
            else:  # its blocks are moving, or it waits in the host pool for an upload
                step.held.append(job)
                if state in (Residency.HOST, Residency.SWAPPING_OUT):
                    step.waiting += books.blocks_for(tokens)
        available = books.device.num_free + books.releasing
        soft = step.short + step.waiting + self.headroom - available  # what headroom wants back
        hard = step.short + step.waiting - available  # what the picked jobs need even without headroom
        window = self._window(step)
        freed = self._offload(step, soft, exclude=set(window)) if soft > 0 else 0
        if hard > freed:
            self._offload(step, hard - freed, exclude=set(), drop_when_host_full=True)
        if not step.swap_out:  # never upload in an iteration that offloads: that is how ping-pong starts
            self._upload(step, window)

    def _reactive(self, step: _Step) -> None:
        books = self.books
        for job, tokens in self._undecided(step):
            state = books.state(job)
            if state is Residency.HOST:
                op = books.swap_in(job, tokens)
                if op is None:
                    step.held.append(job)
                    step.short += books.blocks_for(tokens)
                else:  # runs now; the worker makes its compute wait for this copy
                    step.swap_in.append(op)
                    books.grow(job, tokens)  # room is reserved already; this records the step's tokens
                    step.tables[job] = books.block_table(job)
            elif state is Residency.SWAPPING_OUT:
                step.held.append(job)
            else:
                self._grow_or_hold(step, job, tokens)
        if step.short > books.releasing:
            self._offload(step, step.short - books.releasing, exclude=set(), drop_when_host_full=True)

    def _recompute(self, step: _Step) -> None:
        books = self.books
        victims: list[JobId] | None = None  # found only when some job does not fit
        for job, tokens in self._undecided(step):
            if books.state(job) not in (None, Residency.DROPPED, Residency.DEVICE):
                step.held.append(job)  # a host-side job cannot arise without swaps; never run it from here
                continue
            need = books.extra_blocks(job, tokens)
            if need > books.device.num_free:
                victims = self._victims(step, exclude=set()) if victims is None else victims
                self._drop_for(step, need, victims)
            self._grow_or_hold(step, job, tokens)

    def _defer(self, step: _Step) -> None:
        books = self.books
        for job, tokens in self._undecided(step):
            state = books.state(job)
            if state is Residency.DEVICE:
                self._grow_or_hold(step, job, tokens)
            elif state in (None, Residency.DROPPED):
                # A new job starts only while headroom stays free, so the running jobs keep room to grow.
                if books.device.num_used and books.device.num_free - books.blocks_for(tokens) < self.headroom:
                    step.held.append(job)
                else:
                    self._grow_or_hold(step, job, tokens)
            else:
                step.held.append(job)
        if not step.tables and step.held and not step.in_flight and not books.pending_ops():
            self._unstall(step)

    def _unstall(self, step: _Step) -> None:
        """Defer would wait forever: nothing runs, nothing is in flight, no memory is coming back.
        Let the first picked job in, into the headroom or, failing that, over the dropped KV of the
        idle jobs predicted to run last (then of the later picked jobs)."""
        job = step.held[0]
        tokens = step.batch[job]
        if self.books.state(job) not in (None, Residency.DROPPED, Residency.DEVICE):
            return
        later = [j for j in reversed(step.batch) if j != job and self.books.state(j) is Residency.DEVICE]
        self._drop_for(step, self.books.extra_blocks(job, tokens), self._victims(step, exclude=set()) + later)
        if self.books.grow(job, tokens):
            step.held.remove(job)
            step.tables[job] = self.books.block_table(job)

    def _stalled(self, step: _Step) -> bool:
        """Nothing runs, nothing is in flight and no copy is coming back: waiting changes nothing."""
        return bool(step.held) and not step.tables and not step.in_flight and not step.swap_out \
            and not step.swap_in and not self.books.pending_ops()

    def _yield_to_first(self, step: _Step) -> None:
        """The picked jobs hold each other's room (each needs a block another holds; with bounded
        starts no newcomer displaces them). The later picked jobs give their device blocks up,
        offloaded or, with a full host pool, dropped, until the first held job's need is covered."""
        first = step.held[0]
        if self.books.state(first) not in (None, Residency.DROPPED, Residency.DEVICE):
            return
        need = self.books.extra_blocks(first, step.batch[first]) - self.books.device.num_free
        for job in reversed(step.batch):
            if need <= 0:
                break
            if job == first or self.books.state(job) is not Residency.DEVICE:
                continue
            size = len(self.books.get(job).device)
            op = self.books.swap_out(job) if self.mode in ("proactive", "reactive") else None
            if op is not None:
                step.swap_out.append(op)
            else:
                self.books.drop(job)
                step.dropped.append(job)
            need -= size
        if self.books.grow(first, step.batch[first]):  # room freed by drops is usable at once
            step.held.remove(first)
            step.tables[first] = self.books.block_table(first)

    # ---- pieces --------------------------------------------------------------------------------
    def _undecided(self, step: _Step) -> Iterator[tuple[JobId, int]]:
        """The picked jobs each mode decides on. A device-resident job whose step stays within its
        blocks (most jobs of most iterations) runs in every mode: it is recorded here at once."""
        books, tables = self.books, step.tables
        for job, tokens in step.batch.items():
            table = books.grow_within(job, tokens)
            if table is None:
                yield job, tokens
            else:
                tables[job] = table

    def _grow_or_hold(self, step: _Step, job: JobId, tokens: int) -> None:
        if self.books.grow(job, tokens):
            step.tables[job] = self.books.block_table(job)
        else:  # nothing was taken: the need is as before
            step.held.append(job)
            step.short += self.books.extra_blocks(job, tokens)

    def _window(self, step: _Step) -> list[JobId]:
        """The jobs predicted to make up the next batch: every picked job, then the run order."""
        window = dict.fromkeys(step.batch)
        for job in step.order:
            if len(window) >= self.max_jobs:
                break
            if job not in step.protected:  # jobs in flight cannot be in the next batch
                window[job] = None
        return list(window)

    def _victims(self, step: _Step, exclude: set[JobId]) -> list[JobId]:
        """Device-resident jobs that may leave, the one predicted to run last first."""
        jobs = [j for j in self.books.resident() if j not in step.protected and j not in exclude]
        return sorted(jobs, key=lambda j: step.rank.get(j, _UNRANKED), reverse=True)

    def _offload(self, step: _Step, blocks: int, exclude: set[JobId], drop_when_host_full: bool = False) -> int:
        """Start offloading victims until `blocks` device blocks are on their way back; returns how many.
        With a full host pool, a victim's KV is dropped instead when picked jobs need the room."""
        released = 0
        for job in self._victims(step, exclude):
            if released >= blocks:
                break
            size = len(self.books.get(job).device)
            op = self.books.swap_out(job)
            if op is not None:
                step.swap_out.append(op)
            elif drop_when_host_full:
                self.books.drop(job)
                step.dropped.append(job)
            else:
                continue
            released += size
        return released

    def _drop_for(self, step: _Step, need: int, victims: list[JobId]) -> None:
        """Drop victims (in order) until `need` device blocks are free, if they can make that much."""
        books = self.books
        reclaimable = sum(len(books.get(v).device) for v in victims)
        while books.device.num_free < need <= books.device.num_free + reclaimable:
            victim = victims.pop(0)
            reclaimable -= len(books.get(victim).device)
            books.drop(victim)
            step.dropped.append(victim)

    def _upload(self, step: _Step, window: list[JobId]) -> None:
        # Picked jobs may use the headroom (they are needed now, like arrivals); predicted ones may not.
        free = self.books.device.num_free - step.short
        for job in window:
            entry = self.books.get(job)
            if entry is None or entry.state is not Residency.HOST:
                continue
            tokens = step.batch.get(job, 0)
            need = max(len(entry.host), self.books.blocks_for(tokens))
            if need > free - (0 if job in step.batch else self.headroom):
                return  # keep the order: a later job must not take the room the sooner one waits for
            op = self.books.swap_in(job, tokens)
            if op is None:
                return
            step.swap_in.append(op)
            free -= need

    def _step(self, batch: Any, run_order: Sequence[JobId], in_flight: Collection[JobId]) -> _Step:
        picked = dict(batch.items() if isinstance(batch, Mapping) else batch)
        flying = set(in_flight)
        sizes = picked.values()
        if not (all(type(t) is int for t in sizes) and min(sizes, default=1) > 0
                and self.can_ever_fit(max(sizes, default=1))):  # checked one by one only to say which job
            for job, tokens in picked.items():
                if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
                    raise ValueError(f"job {job!r}: tokens after the step must be an integer > 0, not {tokens!r}")
                if not self.can_ever_fit(tokens):
                    raise ValueError(
                        f"job {job!r} needs {self.books.blocks_for(tokens)} blocks but the device pool has "
                        f"{self.books.device.num_blocks}; reject such jobs at admission (can_ever_fit)"
                    )
        for job in flying.intersection(picked):
            if self.books.get(job) is None:
                raise ValueError(f"job {job!r} is in a batch in flight but holds no KV")
        order = list(run_order)
        rank = dict(zip(reversed(order), range(len(order) - 1, -1, -1)))  # a repeated job keeps its first place
        return _Step(picked, order, rank, set(picked) | flying, flying)

    # ---- the rest of the API -------------------------------------------------------------------
    def reset(self, first_op_id: int | None = None) -> None:
        """Forget every job (a new scheduler serves the stack): all blocks free; copy ids continue from
        the old books' unless given."""
        old = self.books
        first = old.next_op_id if first_op_id is None else max(first_op_id, old.next_op_id)
        self.books = KVBooks(old.device.num_blocks, old.host.num_blocks, old.block_size, old.num_stages, first)

    def ack(self, op_id: int, stage: int = 0) -> bool:
        """A stage finished its part of copy op_id; True once every stage has."""
        return self.books.ack(op_id, stage)

    def free(self, job_id: JobId) -> bool:
        """The job finished, was cancelled or failed (and is in no batch in flight); False if unknown."""
        return self.books.free(job_id)

    def device_lost(self) -> tuple[JobId, ...]:
        """A worker restarted with an empty device pool; returns the jobs that must redo prefill."""
        return self.books.device_lost()

    def can_ever_fit(self, num_tokens: int) -> bool:
        return 0 < self.books.blocks_for(num_tokens) <= self.books.device.num_blocks

    def is_whole(self) -> bool:
        return self.books.is_whole()

    def stats(self) -> dict[str, int]:
        books = self.books
        return {
            "device_blocks_free": books.device.num_free,
            "device_blocks_total": books.device.num_blocks,
            "host_blocks_free": books.host.num_free,
            "host_blocks_total": books.host.num_blocks,
            "copies_in_flight": len(books.pending_ops()),
            # jobs whose KV is only in the host pool now (offloaded, not being uploaded)
            "jobs_swapped": books.residency_counts()[Residency.HOST],
            **books.counters,
            **self._counts,
        }
