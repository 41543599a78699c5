"""CUDA copy executor: exact round trips, device-side waits for uploads, overlap with compute."""

import pytest
import torch

from services.kvcache.books import Direction, SwapOp

pytestmark = pytest.mark.gpu


@pytest.fixture
def executor_parts():
    pytest.importorskip("cupy")
    from workers.copy_executor.cuda import CudaCopyExecutor

    g = torch.Generator().manual_seed(0)
    block = (4, 2, 16, 8, 128)  # 256 KiB per block in float32
    device = torch.randn(32, *block, generator=g).cuda()
    host = torch.zeros(48, *block)
    return CudaCopyExecutor, device, host


def test_round_trip_is_exact(executor_parts):
    cls, device, host = executor_parts
    original = device.clone()
    ex = cls(device, host)
    ex.submit(SwapOp(0, "a", Direction.OUT, ((1, 40), (2, 41), (9, 3))))
    ex.flush()
    device.zero_()
    ex.submit(SwapOp(1, "a", Direction.IN, ((40, 5), (41, 6), (3, 0))))
    ex.flush()
    assert ex.poll() == [0, 1]
    torch.cuda.synchronize()
    assert torch.equal(device[5], original[1]) and torch.equal(device[6], original[2])
    assert torch.equal(device[0], original[9])
    stats = ex.stats()
    assert stats.ops_out == stats.ops_in == 1 and stats.bytes_in == 3 * device[0].numel() * 4
    ex.close()


def test_compute_stream_waits_for_uploads(executor_parts):
    cls, device, host = executor_parts
    host.copy_(torch.arange(host.numel(), dtype=torch.float32).view_as(host))
    ex = cls(device, host)
    # A long queue of uploads ahead of the one the compute needs, so an unsynchronized read would race.
    for i in range(16):
        ex.submit(SwapOp(i, f"busy{i}", Direction.IN, tuple((j, j) for j in range(32))))
    ex.submit(SwapOp(16, "x", Direction.IN, ((47, 31),)))
    ex.wait_for(["x"])  # device-side: no host synchronization here
    snapshot = device[31].clone()  # queued on the compute stream behind the wait
    torch.cuda.synchronize()
    assert torch.equal(snapshot.cpu(), host[47])
    ex.close()


def test_copies_overlap_compute_on_another_stream(executor_parts):
    cls, device, host = executor_parts
    ex = cls(device, host)
    a = torch.randn(4096, 4096, device="cuda")
    ex.compute_begin()
    for i in range(8):
        ex.submit(SwapOp(i, "a", Direction.OUT, tuple((j, j + (i % 2) * 16) for j in range(16))))
    for _ in range(40):
        a = torch.tanh(a @ a)
    ex.compute_end()
    torch.cuda.synchronize()
    ex.flush()
    ex.poll()
    stats = ex.stats()
    assert stats.ops_out == 8 and stats.copy_s > 0
    assert stats.hidden_fraction > 0.9, stats
    ex.close()


def test_uploads_wait_for_compute_already_queued(executor_parts):
    cls, device, host = executor_parts
    ex = cls(device, host)
    device[3].fill_(1.0)
    host[7].fill_(3.0)
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e8))  # about 0.1 s of queued compute ahead of the read below
    snapshot = device[3].clone()  # a kernel queued before the upload still reads the old block
    ex.submit(SwapOp(0, "reused", Direction.IN, ((7, 3),)))
    ex.flush()
    torch.cuda.synchronize()
    assert bool((snapshot == 1.0).all()), "the upload overwrote a block that queued compute had yet to read"
    assert bool((device[3] == 3.0).all())
    ex.close()


def test_copy_times_come_from_each_ops_own_events(executor_parts):
    cls, device, host = executor_parts
    ex = cls(device, host)
    for i in range(4):
        ex.submit(SwapOp(i, "a", Direction.OUT, tuple((j, j) for j in range(16))))
    ex.flush()
    ex.poll()
    stats = ex.stats()
    nbytes = 4 * 16 * device[0].numel() * 4
    assert stats.bytes_out == nbytes and 0 < stats.copy_s < 1.0
    assert nbytes / stats.copy_s > 1e9, stats  # a pinned pool copies at DMA speed, more than 1 GB/s
    ex.close()
