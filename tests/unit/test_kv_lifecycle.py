"""KV books lifecycle: free in every state, worker loss, and a randomized serving loop per mode."""

import random

import pytest

from services.kvcache.books import KVBooks, Residency
from services.kvcache.planner import Planner


def make_planner(mode="proactive", device=8, host=16, headroom=1, max_jobs=2, stages=1):
    return Planner(KVBooks(device, host, 4, stages), mode, headroom, max_jobs)


def offload(p, job, tokens=8):
    """Bring `job` to SWAPPING_OUT: it runs, then a bigger job pushes it out."""
    p.plan({job: tokens}, [job])
    plan = p.plan({"big": 4 * (p.books.device.num_blocks - 1)}, ["big", job])
    (op,) = [o for o in plan.swap_out if o.job_id == job]
    return op


def test_free_in_every_state_leaves_both_pools_whole():
    p = make_planner()
    assert not p.free("never-seen")
    # DEVICE
    p.plan({"d": 8}, ["d"])
    assert p.free("d") and p.is_whole()
    # SWAPPING_OUT: blocks stay taken until the ack, so nothing can overwrite them mid-copy.
    op = offload(p, "o")  # "big" waits for o's 2 blocks
    assert p.free("o") and not p.free("o")
    assert p.books.device.num_free == 6 and p.books.host.num_free == 14
    assert set(p.plan({"x": 24}, ["x"]).block_tables["x"]).isdisjoint(op.src_blocks)
    assert p.plan({"y": 1}, ["y", "x"]).held == ("y",)  # o's blocks are not handed out before the ack
    assert p.ack(op.op_id) and p.books.device.num_free == 2 and p.books.host.num_free == 16
    for job in ("x", "y", "big"):
        p.free(job)
    assert p.is_whole()
    # HOST
    op = offload(p, "h")
    p.ack(op.op_id)
    assert p.books.state("h") is Residency.HOST and p.free("h")
    p.free("big")
    assert p.is_whole()
    # SWAPPING_IN
    op = offload(p, "i")
    p.ack(op.op_id)
    p.free("big")
    plan = p.plan({}, ["i"])
    (up,) = plan.swap_in
    assert p.books.state("i") is Residency.SWAPPING_IN and p.free("i")
    assert not p.is_whole()
    assert p.ack(up.op_id) and p.is_whole()
    # DROPPED
    r = make_planner("recompute")
    r.plan({"a": 16}, ["a"])
    assert r.plan({"b": 32}, ["b", "a"]).dropped == ("a",)
    assert r.free("a") and r.free("b") and r.is_whole()


def test_device_lost_keeps_host_copies_and_writes_off_copies_in_flight():
    books = KVBooks(8, 16, 4)
    for job in "hoin":
        assert books.grow(job, 8)
    books.ack(books.swap_out("h").op_id)
    assert books.grow("x", 8)
    books.ack(books.swap_out("o").op_id)
    up_h = books.swap_in("h")
    out_n, out_x = books.swap_out("n"), books.swap_out("x")
    books.free("x")  # cancelled while its copy is in flight
    assert books.device.num_free == 0
    # The worker restarts: h's upload, n's and x's offloads are in flight; o sits in the host pool.
    dropped = books.device_lost()
    assert sorted(dropped) == ["i", "n"]  # n's host copy may be partial; i lived on the device
    assert books.state("h") is Residency.HOST and books.state("o") is Residency.HOST
    assert books.state("n") is books.state("i") is Residency.DROPPED
    assert books.device.num_free == 8 and books.host.num_free == 12  # h's and o's host copies remain
    for op in (up_h, out_n, out_x):
        assert not books.ack(op.op_id)  # late acks change nothing
    assert books.device_lost() == ()  # nothing more to drop
    for job in "hoin":
        assert books.free(job)
    assert books.is_whole() and books.counters["ops_cancelled"] == 3


def test_device_lost_rolls_an_upload_back_to_the_tokens_its_host_copy_holds():
    p = make_planner("reactive", device=8, host=16, headroom=0)
    p.plan({"a": 6}, ["a"])
    assert p.plan({"b": 32}, ["b", "a"]).swap_out  # a leaves
    p.ack(p.books.get("a").op_id)
    p.free("b")
    plan = p.plan({"a": 7}, ["a"])  # reactive: a runs while its upload is in flight
    assert list(plan.block_tables) == ["a"] and p.books.get("a").num_tokens == 7
    assert p.device_lost() == ()
    entry = p.books.get("a")
    assert entry.state is Residency.HOST and entry.num_tokens == 6  # the 7th token's step was lost
    p.free("a")
    assert p.is_whole()


# ---- a randomized serving loop ------------------------------------------------------------------


class FakeStack:
    """Drives the planner like the scheduler and S stage workers would, and keeps the block contents:
    a block holds (job, index); copies happen as late as their ack allows, so any reuse of a block
    before its copy was acknowledged corrupts data the next run of its job checks."""

    def __init__(self, planner, rng, stages=2):
        self.p, self.rng, self.stages = planner, rng, stages
        self.device: dict[int, tuple] = {}
        self.host: dict[int, tuple] = {}
        self.valid: dict = {}  # job -> blocks whose contents must be intact
        self.ops: dict[int, object] = {}  # op_id -> op, not yet acked
        self.flight: list[dict] = []  # batches in the pipeline, oldest first

    def copy(self, op):
        src, dst = (self.device, self.host) if op.direction == "out" else (self.host, self.device)
        for s, d in op.pairs:
            dst[d] = src.get(s)

    def step(self, batch, order):
        in_flight = {j for b in self.flight for j in b}
        plan = self.p.plan(batch, order, in_flight)
        assert set(plan.run) | set(plan.held) == set(batch)
        for op in plan.swap_out:  # a picked job may be offloaded only when it is held (it yields its room)
            assert op.job_id not in plan.block_tables and op.job_id not in in_flight
        if self.p.mode == "proactive":
            assert not (plan.swap_out and plan.swap_in)
        for job in plan.dropped:
            assert job not in plan.block_tables and job not in in_flight
            self.valid.pop(job, None)
        for op in (*plan.swap_out, *plan.swap_in):
            self.ops[op.op_id] = op
        for job, table in plan.block_tables.items():
            entry = self.p.books.get(job)
            assert len(table) == self.p.books.blocks_for(batch[job])
            if entry.op_id is not None:  # reactive, or proactive's upload_wait, runs a job whose upload is in flight
                assert self.p.mode in ("reactive", "proactive") and entry.state is Residency.SWAPPING_IN
                self.copy(self.ops[entry.op_id])  # the compute waits for it
            for i in range(self.valid.get(job, 0)):
                assert self.device.get(table[i]) == (job, i), f"{job} block {i} corrupted"
            for i, b in enumerate(table):
                self.device[b] = (job, i)
            self.valid[job] = len(table)
        self.flight.append(dict(plan.block_tables))
        self.check_ownership()
        return plan

    def deliver_acks(self, fraction):
        for op_id in list(self.ops):
            if self.rng.random() < fraction:
                op = self.ops.pop(op_id)
                if self.p.books.get(op.job_id) is not None or op.direction == "out":
                    self.copy(op)
                if op.direction == "out":
                    self.valid[op.job_id] = len(op.pairs)
                for stage in range(self.p.books.num_stages):
                    self.p.ack(op_id, stage)

    def check_ownership(self):
        books = self.p.books
        owned_d = [b for e in books.jobs() for b in e.device]
        owned_h = [b for e in books.jobs() for b in e.host]
        assert len(owned_d) == len(set(owned_d)) and len(owned_h) == len(set(owned_h))
        assert set(books.resident()) == {e.job_id for e in books.jobs() if e.state is Residency.DEVICE}
        assert len(owned_d) + books.device.num_free <= books.device.num_blocks
        assert len(owned_h) + books.host.num_free <= books.host.num_blocks


@pytest.mark.parametrize("mode", ["proactive", "reactive", "recompute", "defer"])
@pytest.mark.parametrize("seed", range(4))
def test_random_serving_loop_keeps_kv_intact_and_ends_whole(mode, seed):
    rng = random.Random(seed)
    p = Planner(KVBooks(24, 48, 4, num_stages=2), mode, headroom_blocks=3, max_jobs=4)
    stack = FakeStack(p, rng)
    jobs = {}  # job -> [prompt, generated, output_len]
    next_id, finished, iterations = 0, 0, 0
    while finished < 40:
        iterations += 1
        assert iterations < 5000, f"no progress: {p.stats()}"
        if next_id < 40 and rng.random() < 0.4:
            jobs[next_id] = [rng.randint(1, 20), 0, rng.randint(1, 30)]
            next_id += 1
        # Retire the oldest batch in the pipeline once it is full.
        if len(stack.flight) >= 2 or (stack.flight and rng.random() < 0.3):
            for job in stack.flight.pop(0):
                if job in jobs:
                    jobs[job][1] += 1
                    if jobs[job][1] >= jobs[job][2] or rng.random() < 0.01:  # done, or cancelled
                        del jobs[job]
                        p.free(job)
                        stack.valid.pop(job, None)
                        finished += 1
        stack.deliver_acks(rng.random())
        in_flight = {j for b in stack.flight for j in b}
        order = sorted(jobs, key=lambda j: (jobs[j][1] // 4, rng.random()))  # a shuffled MLFQ-like order
        batch = {j: jobs[j][0] + jobs[j][1] for j in order if j not in in_flight}
        batch = dict(list(batch.items())[:4])
        if batch or stack.flight:
            stack.step(batch, order)
        if mode != "defer" and rng.random() < 0.005:  # a worker restarts
            stack.flight.clear()
            for job in p.device_lost():
                stack.valid.pop(job, None)
            stack.ops.clear()
            for entry in p.books.jobs():  # uploads in flight fall back to their host copy
                if entry.state is Residency.HOST:
                    stack.valid[entry.job_id] = len(entry.host)
    stack.flight.clear()
    stack.deliver_acks(1.0)
    assert p.is_whole(), p.stats()
    stats = p.stats()
    if mode in ("proactive", "reactive"):
        assert stats["swaps_out"] > 0 and stats["swaps_in"] > 0
    if mode == "recompute":
        assert stats["dropped"] > 0 and stats["swaps_out"] == 0
    if mode == "defer":
        assert stats["swaps_out"] == stats["swaps_in"] == 0
