"""Planner baselines (reactive, recompute, defer), pipelines, multi-stage acks, and bad input."""

import pytest

from services.kvcache.books import Direction, KVBooks, Residency
from services.kvcache.planner import Planner


def make_planner(mode, device=8, host=16, block_size=4, headroom=2, max_jobs=2, stages=1):
    return Planner(KVBooks(device, host, block_size, stages), mode, headroom, max_jobs)


def test_reactive_swaps_out_only_when_an_allocation_fails_and_in_only_when_picked():
    p = make_planner("reactive")
    p.plan({"A": 8, "B": 8}, ["A", "B"])  # A [0,1], B [2,3]
    plan = p.plan({"C": 16}, ["C", "A", "B"])  # C [4..7]: 0 free, yet no swap (headroom is not kept)
    assert plan.block_tables == {"C": (4, 5, 6, 7)} and not plan.swap_out
    # D needs 2: allocation fails, so the latest predicted job (A) is offloaded; D waits.
    plan = p.plan({"D": 5}, ["D", "C", "B", "A"])
    assert plan.held == ("D",) and [o.job_id for o in plan.swap_out] == ["A"]
    plan = p.plan({"D": 5}, ["D", "C", "B", "A"])  # A's blocks are on their way: nothing more moves
    assert plan.held == ("D",) and not plan.swap_out
    p.ack(p.books.get("A").op_id)
    assert p.plan({"D": 5}, ["D", "C", "B", "A"]).block_tables == {"D": (0, 1)}
    p.free("C")
    # A is picked: uploaded now and run in the same iteration (the worker's compute waits for the copy);
    # B is not uploaded ahead of need, though it is next in line and there is room.
    plan = p.plan({"A": 9}, ["A", "B", "D"])
    assert list(plan.block_tables) == ["A"] and len(plan.block_tables["A"]) == 3
    assert [(o.job_id, o.direction) for o in plan.swap_in] == [("A", Direction.IN)]
    assert plan.swap_in[0].dst_blocks == plan.block_tables["A"][:2]
    # Picked again before the ack: it still runs (the stage stream keeps the copy ahead of compute).
    assert p.plan({"A": 10}, ["A"]).block_tables == plan.block_tables
    p.ack(plan.swap_in[0].op_id)
    for job in "ABD":
        p.free(job)
    assert p.is_whole()


def test_recompute_drops_the_latest_jobs_and_reports_them():
    p = make_planner("recompute")
    p.plan({"A": 8, "B": 8}, ["A", "B"])
    p.plan({"C": 8}, ["C", "A", "B"])  # 2 free
    plan = p.plan({"D": 16}, ["D", "C", "A", "B"])  # needs 4: dropping B (last in line) is enough
    assert plan.dropped == ("B",) and list(plan.block_tables) == ["D"]
    assert not plan.swap_out and not plan.swap_in
    assert p.books.state("B") is Residency.DROPPED and p.books.get("B").device == []
    # B resumes and redoes prefill over all its tokens (3 blocks): A then C make room, latest first.
    plan = p.plan({"B": 9}, ["B", "D", "C", "A"])
    assert plan.dropped == ("A", "C") and len(plan.block_tables["B"]) == 3
    assert p.stats()["dropped"] == 3
    # Nothing idle to drop (B and D are in flight): E waits rather than dropping in vain.
    plan = p.plan({"E": 8}, ["E", "B", "D"], in_flight=["B", "D"])
    assert plan.held == ("E",) and plan.dropped == ()
    for job in "ABCDE":
        p.free(job)
    assert p.is_whole()


def test_defer_never_moves_kv_and_keeps_headroom_for_growth():
    p = make_planner("defer")
    assert p.plan({"A": 12}, ["A"]).block_tables == {"A": (0, 1, 2)}
    plan = p.plan({"A": 13, "B": 12}, ["A", "B"])  # B would leave 1 < headroom 2 free: it waits
    assert plan.block_tables == {"A": (0, 1, 2, 3)} and plan.held == ("B",)
    assert p.plan({"A": 14, "B": 8}, ["A", "B"]).block_tables == {"A": (0, 1, 2, 3), "B": (4, 5)}  # leaves 2
    plan = p.plan({"A": 17, "B": 9}, ["A", "B"])  # the running jobs grow into the headroom
    assert plan.block_tables == {"A": (0, 1, 2, 3, 6), "B": (4, 5, 7)} and p.books.device.num_free == 0
    # Full: A cannot grow and C cannot start. B is still in the pipeline, so memory may come back: wait.
    plan = p.plan({"A": 21, "C": 1}, ["A", "C", "B"], in_flight=["B"])
    assert plan.held == ("A", "C") and not plan.swap_out and not plan.dropped
    # Nothing in flight and nothing would run: waiting would stall for ever, so the idle job predicted
    # to run last (B) gives its KV up (it will redo prefill) and the first picked job goes on.
    plan = p.plan({"A": 21, "C": 1}, ["A", "C", "B"])
    assert plan.dropped == ("B",) and list(plan.block_tables) == ["A"] and plan.held == ("C",)
    assert not plan.swap_out and not plan.swap_in
    p.free("A")
    p.free("B")
    assert len(p.plan({"C": 32}, ["C"]).block_tables["C"]) == 8  # an empty pool admits any job that fits
    p.free("C")
    assert p.is_whole() and p.stats()["swaps_out"] == p.stats()["swaps_in"] == 0


def test_proactive_never_offloads_jobs_in_flight():
    p = make_planner("proactive", device=8, headroom=2, max_jobs=1)
    p.plan({"A": 8}, ["A"])
    p.plan({"B": 8}, ["B", "A"])
    # A and B are both in batches still in the pipeline; C leaves 0 free. Only idle jobs may go: none.
    plan = p.plan({"C": 16}, ["C", "B", "A"], in_flight=["A", "B"])
    assert plan.block_tables == {"C": (4, 5, 6, 7)} and not plan.swap_out
    plan = p.plan({"C": 17}, ["C", "B", "A"], in_flight=["B"])
    assert plan.held == ("C",) and [o.job_id for o in plan.swap_out] == ["A"]


def test_an_op_completes_only_when_every_stage_acked():
    p = make_planner("proactive", device=4, headroom=0, max_jobs=1, stages=3)
    p.plan({"A": 8}, ["A"])
    plan = p.plan({"B": 16}, ["B", "A"])
    (op,) = plan.swap_out
    assert not p.ack(op.op_id, stage=0) and not p.ack(op.op_id, stage=0)  # a repeat counts once
    assert not p.ack(op.op_id, stage=2)
    assert p.books.state("A") is Residency.SWAPPING_OUT and p.books.device.num_free == 2
    assert p.ack(op.op_id, stage=1)
    assert p.books.state("A") is Residency.HOST and p.books.device.num_free == 4
    with pytest.raises(ValueError, match="stage 3"):
        p.ack(op.op_id, stage=3)
    with pytest.raises(KeyError, match="no copy op"):
        p.ack(op.op_id, stage=0)


@pytest.mark.parametrize(
    "batch, in_flight, message",
    [
        ({"A": 0}, (), "integer > 0"),
        ({"A": 2.5}, (), "integer > 0"),
        ({"A": 4}, ("A",), "in a batch in flight but holds no KV"),
        ({"A": 33}, (), "can_ever_fit"),
    ],
)
def test_bad_batches_are_refused(batch, in_flight, message):
    p = make_planner("proactive")
    with pytest.raises(ValueError, match=message):
        p.plan(batch, [], in_flight)
    assert p.is_whole()


def test_a_resident_job_cannot_shrink_and_bad_settings_are_refused():
    p = make_planner("proactive")
    p.plan({"A": 8}, ["A"])
    with pytest.raises(ValueError, match="cannot shrink"):
        p.plan({"A": 4}, ["A"])
    with pytest.raises(ValueError, match="swap mode"):
        make_planner("lazy")
    with pytest.raises(ValueError, match="headroom"):
        make_planner("proactive", device=4, headroom=4)
    with pytest.raises(ValueError, match="max_jobs"):
        make_planner("proactive", max_jobs=0)
    assert p.can_ever_fit(32) and not p.can_ever_fit(33) and not p.can_ever_fit(0)


def test_from_config_uses_the_cache_and_scheduler_sections():
    from common.config import Config

    config = Config().replace(
        cache={"num_gpu_blocks": 64, "num_host_blocks": 128, "swap": "recompute", "headroom_blocks": 3},
        scheduler={"max_jobs": 5},
        parallel={"num_stages": 3},
    )
    p = Planner.from_config(config)
    assert (p.mode, p.headroom, p.max_jobs, p.books.num_stages) == ("recompute", 3, 5, 3)
    assert p.stats()["device_blocks_total"] == 64 and p.stats()["host_blocks_total"] == 128
