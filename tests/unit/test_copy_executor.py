"""Copy executor (CPU backend) and the overlap meter."""


import pytest
import torch

from services.kvcache.books import Direction, SwapOp
from workers.copy_executor import CopyError, CpuCopyExecutor, make_executor
from workers.copy_executor.base import block_runs
from workers.copy_executor.overlap import COMPUTE, COPY, CopyStats, OverlapMeter

BLOCK = (2, 2, 4, 3)  # layers, k/v, tokens, dim


def pools(device_blocks=8, host_blocks=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(device_blocks, *BLOCK, generator=g), torch.zeros(host_blocks, *BLOCK)


def op(op_id, job, direction, pairs):
    return SwapOp(op_id, job, direction, tuple(pairs))


class WireOp:
    """The shape of the wire message: plain strings and lists."""

    def __init__(self, op_id, job_id, direction, src_blocks, dst_blocks):
        self.op_id, self.job_id, self.direction = op_id, job_id, direction
        self.src_blocks, self.dst_blocks = src_blocks, dst_blocks


def test_round_trip_is_exact_and_acks_come_in_order():
    device, host = pools()
    original = device.clone()
    with CpuCopyExecutor(device, host) as ex:
        ex.submit(op(0, "a", Direction.OUT, [(1, 0), (2, 1), (6, 9)]))
        ex.submit(op(1, "b", Direction.OUT, [(3, 4)]))
        ex.flush()
        device.zero_()
        ex.submit(op(2, "a", Direction.IN, [(0, 5), (1, 4), (9, 0)]))
        ex.submit(WireOp(3, "b", "in", [4], [7]))
        ex.flush()
        assert ex.poll() == [0, 1, 2, 3]
        assert ex.poll() == []
        assert torch.equal(device[5], original[1]) and torch.equal(device[4], original[2])
        assert torch.equal(device[0], original[6]) and torch.equal(device[7], original[3])
        assert float(device[[1, 2, 3, 6]].abs().sum()) == 0.0  # nothing else written
        stats = ex.stats()
    block_bytes = 2 * 2 * 4 * 3 * 4
    assert (stats.ops_out, stats.ops_in) == (2, 2)
    assert stats.bytes_out == stats.bytes_in == 4 * block_bytes
    assert stats.copy_s > 0 and stats.overlap_s == 0.0


def test_ops_run_in_submission_order_even_through_the_same_blocks():
    device, host = pools()
    first = device[0].clone()
    with CpuCopyExecutor(device, host) as ex:
        ex.submit(op(0, "a", Direction.OUT, [(0, 0)]))  # host[0] = device[0]
        ex.submit(op(1, "b", Direction.IN, [(0, 3)]))  # device[3] = host[0] (after the first op)
        ex.submit(op(2, "c", Direction.OUT, [(5, 0)]))  # then host[0] is overwritten
        ex.flush()
    assert torch.equal(device[3], first) and torch.equal(host[0], device[5])


def test_wait_for_returns_once_the_jobs_copies_landed():
    device, host = pools(device_blocks=64, host_blocks=64)
    with CpuCopyExecutor(device, host) as ex:
        for i in range(32):
            ex.submit(op(i, f"j{i % 4}", Direction.OUT, [(i, i), (i + 32, i + 32)]))
        ex.wait_for(["j1"], timeout=30)
        assert torch.equal(host[29], device[29]) and torch.equal(host[61], device[61])
        ex.wait_for(["never-submitted"], timeout=1)  # nothing pending: returns at once
        ex.flush()
        assert sorted(ex.poll()) == list(range(32))


def test_overlap_counts_copies_inside_compute_exactly():
    device, host = pools(device_blocks=64, host_blocks=64)
    with CpuCopyExecutor(device, host) as ex:
        ex.submit(op(0, "a", Direction.OUT, [(i, i) for i in range(64)]))
        ex.flush()  # outside any compute
        outside = ex.stats().copy_s
        ex.compute_begin()
        ex.submit(op(1, "a", Direction.IN, [(i, 63 - i) for i in range(64)]))
        ex.flush()  # entirely inside the compute interval
        ex.compute_end()
        stats = ex.stats()
    assert outside > 0 and stats.overlap_s == pytest.approx(stats.copy_s - outside, abs=1e-12)
    assert stats.compute_s >= stats.overlap_s
    assert 0 < stats.hidden_fraction < 1


def test_compute_brackets_must_pair():
    with CpuCopyExecutor(*pools()) as ex:
        with pytest.raises(CopyError, match="without compute_begin"):
            ex.compute_end()
        ex.compute_begin()
        with pytest.raises(CopyError, match="twice"):
            ex.compute_begin()
        ex.compute_end()


@pytest.mark.parametrize(
    "bad, message",
    [
        (WireOp(0, "a", "sideways", [0], [0]), "direction"),
        (WireOp(0, "a", "out", [0, 1], [0]), "2 source blocks but 1"),
        (WireOp(0, "a", "out", [8], [0]), "outside a pool of 8"),
        (WireOp(0, "a", "in", [0], [8]), "outside a pool of 8"),
        (WireOp(0, "a", "in", [0, 1], [3, 3]), "appears twice"),
    ],
)
def test_malformed_ops_are_refused_at_submit(bad, message):
    with CpuCopyExecutor(*pools()) as ex:
        with pytest.raises(CopyError, match=message):
            ex.submit(bad)
        assert ex.poll() == []


def test_mismatched_pools_are_refused():
    with pytest.raises(CopyError, match="pool blocks differ"):
        CpuCopyExecutor(torch.zeros(4, 2, 3), torch.zeros(4, 3, 2))
    with pytest.raises(CopyError, match="pool blocks differ"):
        CpuCopyExecutor(torch.zeros(4, 2), torch.zeros(4, 2, dtype=torch.float16))


def test_a_failing_copy_surfaces_on_the_next_call(monkeypatch):
    import workers.copy_executor.cpu as cpu

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(cpu, "copy_blocks", broken)
    ex = CpuCopyExecutor(*pools())
    ex.submit(op(0, "a", Direction.OUT, [(0, 0)]))
    with pytest.raises(CopyError, match="disk on fire"):
        ex.wait_for(["a"], timeout=30)
    with pytest.raises(CopyError):
        ex.poll()
    with pytest.raises(CopyError):
        ex.close()


def test_make_executor_picks_the_cpu_backend_for_cpu_pools():
    ex = make_executor(*pools())
    assert isinstance(ex, CpuCopyExecutor)
    ex.close()


def test_copies_overlap_with_a_compute_thread():
    """Compute on this thread while the copy thread works: the meter sees real concurrency."""
    device, host = pools(device_blocks=256, host_blocks=256)
    a = torch.randn(256, 256)
    with CpuCopyExecutor(device, host) as ex:
        ex.compute_begin()
        for i in range(8):
            ex.submit(op(i, "a", Direction.OUT, [(j, (j * 7 + i) % 256) for j in range(256)]))
        while ex.stats().ops_out < 8:
            a = torch.tanh(a @ a)  # the compute
        ex.compute_end()
        stats = ex.stats()
    assert stats.hidden_fraction == pytest.approx(1.0)


def test_block_runs_merge_consecutive_pairs():
    assert block_runs([1, 2, 3, 7], [4, 5, 6, 0]) == [(1, 4, 3), (7, 0, 1)]
    assert block_runs([1, 2], [5, 4]) == [(1, 5, 1), (2, 4, 1)]
    assert block_runs([], []) == []


# ---- the overlap meter, fed by hand ------------------------------------------------------------


def test_meter_intersects_two_interval_streams():
    m = OverlapMeter()
    m.begin(COMPUTE)
    m.add(COPY, 0.0, 1.0)  # compute is open: kept
    m.begin(COPY)  # the next copy starts at 2.0, before the compute closes
    m.add(COMPUTE, 0.5, 3.0)  # meets the first copy for 0.5
    m.add(COPY, 2.0, 4.0)  # meets the compute for 1.0
    m.add(COMPUTE, 5.0, 6.0)  # copy is closed and idle: nothing to meet
    assert m.overlap_s == pytest.approx(1.5)
    assert m.busy_s == [pytest.approx(3.0), pytest.approx(3.5)]


def test_meter_drops_what_can_no_longer_meet_anything():
    m = OverlapMeter()
    for i in range(1000):
        m.add(COMPUTE, float(i), i + 0.5)  # copies idle the whole time
    assert m.overlap_s == 0.0 and not m._closed[COMPUTE]
    m.begin(COPY)
    m.add(COMPUTE, 2000.0, 2001.0)
    m.add(COMPUTE, 2002.0, 2003.0)
    m.add(COPY, 2000.5, 2002.5)
    assert m.overlap_s == pytest.approx(1.0)
    assert len(m._closed[COMPUTE]) + len(m._closed[COPY]) <= 1


def test_meter_rejects_backwards_intervals_and_reports_hidden_fraction():
    with pytest.raises(ValueError):
        OverlapMeter().add(COPY, 2.0, 1.0)
    assert CopyStats().hidden_fraction == 1.0
    assert CopyStats(copy_s=2.0, overlap_s=1.5).hidden_fraction == 0.75
