"""Host pool: layout, create/attach across processes, survival of a worker's exit, cleanup."""

import multiprocessing as mp
import uuid

import pytest
import torch

from common.hostpool import HostPool, HostPoolError, HostPoolLayout

LAYOUT = HostPoolLayout(num_host_blocks=6, block_shapes=((2, 2, 4, 2, 8), (1, 2, 4, 2, 8)), dtype=torch.float16)


@pytest.fixture
def name():
    return f"fs_test_{uuid.uuid4().hex[:12]}"


def _worker(name, stage, value, queue):
    """A separate process: attach, check the creator's data, write its own, exit without cleanup."""
    pool = HostPool.attach(name, LAYOUT)
    view = pool.view(stage)
    queue.put((float(view[0].float().mean()), tuple(view.shape)))
    view[3].fill_(value)
    del view
    pool.close()


def test_layout_partitions_are_page_aligned_and_sized_per_stage():
    assert LAYOUT.block_bytes(0) == 2 * 2 * 4 * 2 * 8 * 2
    assert LAYOUT.block_bytes(1) == LAYOUT.block_bytes(0) // 2
    assert LAYOUT.offset(0) == 0
    assert LAYOUT.offset(1) == 4096  # 6 * 512 bytes rounded up to a page
    assert LAYOUT.nbytes == 8192


def test_second_process_attaches_and_the_segment_survives_its_exit(name):
    ctx = mp.get_context("spawn")
    with HostPool.create(name, LAYOUT) as pool:
        stage1 = pool.view(1)
        stage1[0].fill_(1.5)
        queue = ctx.Queue()
        proc = ctx.Process(target=_worker, args=(name, 1, 7.0, queue))
        proc.start()
        mean, shape = queue.get(timeout=60)
        proc.join(timeout=60)
        assert proc.exitcode == 0
        assert mean == 1.5 and shape == (6, 1, 2, 4, 2, 8)
        # The worker is gone; its write is visible and the segment is still attachable.
        assert torch.equal(stage1[3], torch.full((1, 2, 4, 2, 8), 7.0, dtype=torch.float16))
        again = HostPool.attach(name, LAYOUT)
        assert float(again.view(1)[3].float().sum()) == 7.0 * 128
        assert float(pool.view(0).float().abs().sum()) == 0.0  # stage 0 untouched
        again.close()
        del stage1
    with pytest.raises(HostPoolError, match="does not exist"):
        HostPool.attach(name, LAYOUT)


def test_create_twice_is_refused_unless_replacing(name):
    pool = HostPool.create(name, LAYOUT)
    try:
        with pytest.raises(HostPoolError, match="already exists"):
            HostPool.create(name, LAYOUT)
        fresh = HostPool.create(name, LAYOUT, replace=True)
        fresh.close()
    finally:
        pool.close()


def test_attach_with_a_bigger_layout_is_refused(name):
    bigger = HostPoolLayout(64, LAYOUT.block_shapes, torch.float32)
    with HostPool.create(name, LAYOUT):
        with pytest.raises(HostPoolError, match="created for another"):
            HostPool.attach(name, bigger)


def test_bad_stage_and_bad_layouts(name):
    with HostPool.create(name, LAYOUT) as pool:
        with pytest.raises(HostPoolError, match="out of range"):
            pool.view(2)
    with pytest.raises(HostPoolError):
        HostPoolLayout(-1, ((1, 2),), torch.float32)
    with pytest.raises(HostPoolError):
        HostPoolLayout(4, ((1, 0),), torch.float32)


def test_bfloat16_views_and_layout_from_config():
    from common.config import Config

    config = Config().replace(cache={"num_host_blocks": 3, "block_size": 4}, model={"path": "tiny", "dtype": "bfloat16"})
    layout = HostPoolLayout.from_config(config)
    assert layout.num_stages == 2 and layout.num_host_blocks == 3 and layout.dtype is torch.bfloat16
    name = f"fs_test_{uuid.uuid4().hex[:12]}"
    with HostPool.create(name, layout) as pool:
        view = pool.view(1)
        assert view.dtype is torch.bfloat16 and view.shape == (3, *layout.block_shapes[1])
        view.fill_(2.0)
        assert float(view.float().mean()) == 2.0
        del view


def test_a_pool_larger_than_free_shared_memory_is_refused_at_creation_with_what_to_change(monkeypatch):
    from common import hostpool

    layout = HostPoolLayout(64, ((2, 2, 16, 2, 8),), torch.float32)
    monkeypatch.setattr(hostpool, "shm_free_bytes", lambda where=hostpool.SHM_DIR: layout.nbytes // 4)
    name = f"fastserve_test_{uuid.uuid4().hex[:8]}"
    with pytest.raises(HostPoolError, match=r"lower cache.num_host_blocks to 1[56] or less"):
        HostPool.create(name, layout)
    assert not (hostpool.SHM_DIR / name).exists()  # nothing was created
