"""BlockAllocator: ordering, exhaustion, and refusal of corrupting frees."""

import pytest

from services.kvcache.allocator import AllocatorError, BlockAllocator


def test_fresh_pool_hands_out_ascending_contiguous_ids():
    pool = BlockAllocator(8)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) == [3, 4]
    assert pool.num_free == 3 and pool.num_used == 5


def test_freed_blocks_come_back_in_their_order():
    pool = BlockAllocator(6)
    a = pool.allocate(3)
    pool.allocate(2)
    pool.free(a)
    assert pool.allocate(3) == [0, 1, 2]


def test_zero_blocks_and_zero_sized_pool():
    assert BlockAllocator(4).allocate(0) == []
    empty = BlockAllocator(0)
    assert empty.is_whole() and empty.num_free == 0
    assert empty.try_allocate(1) is None


def test_exhaustion_raises_and_takes_nothing():
    pool = BlockAllocator(4)
    pool.allocate(3)
    with pytest.raises(AllocatorError, match="only 1 of 4"):
        pool.allocate(2)
    assert pool.num_free == 1
    assert pool.try_allocate(2) is None
    assert pool.try_allocate(1) == [3]


def test_double_free_is_an_error_and_frees_nothing():
    pool = BlockAllocator(4)
    ids = pool.allocate(2)
    pool.free(ids[:1])
    with pytest.raises(AllocatorError, match="freed twice"):
        pool.free(ids)  # ids[0] is already free; ids[1] must stay owned
    assert pool.num_free == 3
    with pytest.raises(AllocatorError, match="freed twice"):
        pool.free([ids[1], ids[1]])
    pool.free([ids[1]])
    assert pool.is_whole()


@pytest.mark.parametrize("bad", [-1, 4, 1.0, "1", True])
def test_foreign_ids_are_refused(bad):
    pool = BlockAllocator(4)
    pool.allocate(4)
    with pytest.raises(AllocatorError):
        pool.free([bad])
    assert pool.num_free == 0


@pytest.mark.parametrize("bad", [-1, 1.5, None, True])
def test_bad_counts_are_refused(bad):
    with pytest.raises(AllocatorError):
        BlockAllocator(4).allocate(bad)
    with pytest.raises(AllocatorError):
        BlockAllocator(bad)
