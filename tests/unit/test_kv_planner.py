"""Planner: a hand-worked proactive sequence, each baseline mode, pipelines, and bad input."""


from services.kvcache.books import Direction, KVBooks, Residency
from services.kvcache.planner import Planner


def make_planner(mode="proactive", device=10, host=20, block_size=4, headroom=2, max_jobs=2, stages=1,
                 upload_wait=False):
    return Planner(KVBooks(device, host, block_size, stages), mode, headroom, max_jobs, upload_wait)


def test_proactive_hand_worked_sequence():
    """10 device blocks of 4 tokens, headroom 2, one batch = 2 jobs."""
    p = make_planner()
    state = p.books.state

    # 1: A and B start (2 blocks each).
    plan = p.plan({"A": 8, "B": 8}, ["A", "B"])
    assert plan.block_tables == {"A": (0, 1), "B": (2, 3)} and not plan.held
    # 2: C and D arrive and run; A, B are preempted. Free = 2 = headroom: nothing moves.
    plan = p.plan({"C": 8, "D": 8}, ["C", "D", "A", "B"])
    assert plan.block_tables == {"C": (4, 5), "D": (6, 7)}
    assert not plan.swap_out and not plan.swap_in
    # 3: E (3 blocks) does not fit; C grows into block 8. Short 3 + headroom 2 against 1 free:
    # offload 4 blocks, latest predicted run first (B, then A), D stays (it runs sooner). No upload.
    plan = p.plan({"E": 12, "C": 9}, ["E", "C", "D", "A", "B"])
    assert plan.block_tables == {"C": (4, 5, 8)} and plan.held == ("E",)
    assert [(op.job_id, op.direction, op.pairs) for op in plan.swap_out] == [
        ("B", Direction.OUT, ((2, 0), (3, 1))),
        ("A", Direction.OUT, ((0, 2), (1, 3))),
    ]
    assert not plan.swap_in
    op_b, op_a = (op.op_id for op in plan.swap_out)
    assert state("A") is state("B") is Residency.SWAPPING_OUT
    # 4: copies not acked yet: their blocks are not reused; E waits, and nothing more is offloaded
    # because the 4 blocks on their way back already cover the need.
    plan = p.plan({"E": 12, "C": 10}, ["E", "C", "D", "A", "B"])
    assert plan.block_tables == {"C": (4, 5, 8)} and plan.held == ("E",)
    assert not plan.swap_out and not plan.swap_in
    assert p.books.device.num_free == 1
    assert p.ack(op_b) and p.ack(op_a)
    assert state("A") is state("B") is Residency.HOST
    # 5: E runs in the blocks A left.
    plan = p.plan({"E": 12, "C": 11}, ["E", "C", "D", "A", "B"])
    assert plan.block_tables == {"E": (0, 1, 2), "C": (4, 5, 8)}
    # 6: C finished. E grows; A is predicted next, so it is uploaded ahead of need (free 4 - headroom 2).
    assert p.free("C")
    plan = p.plan({"E": 13}, ["E", "A", "D", "B"])
    assert plan.block_tables == {"E": (0, 1, 2, 4)}
    assert [(op.job_id, op.direction, op.pairs) for op in plan.swap_in] == [("A", Direction.IN, ((2, 5), (3, 8)))]
    assert not plan.swap_out
    assert p.books.device.num_free == 2  # headroom kept
    # 7: A is picked but its upload is not acknowledged: it skips this iteration.
    plan = p.plan({"E": 14, "A": 9}, ["E", "A", "D", "B"])
    assert plan.block_tables == {"E": (0, 1, 2, 4)} and plan.held == ("A",)
    assert p.ack(plan_op(p, "A"))
    # 8: A runs in its uploaded blocks plus one new block for its 9th token. That leaves 1 free,
    # under the headroom, so D (the only resident job outside the next batch) is offloaded.
    plan = p.plan({"E": 15, "A": 9}, ["E", "A", "D", "B"])
    assert plan.block_tables == {"E": (0, 1, 2, 4), "A": (5, 8, 3)}
    assert [(op.job_id, op.pairs) for op in plan.swap_out] == [("D", ((6, 2), (7, 3)))]  # A's host blocks, reused
    stats = p.stats()
    assert (stats["swaps_out"], stats["swaps_in"], stats["blocks_out"], stats["blocks_in"]) == (3, 1, 6, 2)
    p.ack(plan.swap_out[0].op_id)
    for job in "ABDE":
        assert p.free(job)
    assert p.is_whole() and p.stats()["host_blocks_free"] == 20


def plan_op(p, job):
    return p.books.get(job).op_id


def test_upload_wait_runs_a_picked_job_whose_upload_is_in_flight():
    p = make_planner(upload_wait=True)
    p.plan({"A": 8, "B": 8}, ["A", "B"])
    p.plan({"C": 8, "D": 8}, ["C", "D", "A", "B"])
    plan = p.plan({"E": 12, "C": 9}, ["E", "C", "D", "A", "B"])  # B and A go out, as in the sequence above
    for op in plan.swap_out:
        p.ack(op.op_id)
    p.plan({"E": 12, "C": 11}, ["E", "C", "D", "A", "B"])
    p.free("C")
    plan = p.plan({"E": 13}, ["E", "A", "D", "B"])  # A is uploaded ahead of need
    op_a = plan_op(p, "A")
    assert [op.job_id for op in plan.swap_in] == ["A"]
    # A is picked before its upload is acknowledged: it runs now in the blocks the upload fills,
    # plus one for its 9th token (the worker's compute waits for the copy), instead of skipping.
    plan = p.plan({"E": 14, "A": 9}, ["E", "A", "D", "B"])
    assert plan.block_tables == {"E": (0, 1, 2, 4), "A": (5, 8, 3)} and not plan.held
    assert p.books.state("A") is Residency.SWAPPING_IN and plan_op(p, "A") == op_a
    assert p.ack(op_a) and p.books.state("A") is Residency.DEVICE
    for op in plan.swap_out:  # D leaves to win back the headroom, as in step 8 above
        p.ack(op.op_id)
    for job in "ABDE":
        p.free(job)
    assert p.is_whole()


def test_no_upload_in_an_iteration_that_offloads():
    p = make_planner(device=10, headroom=2, max_jobs=1)
    p.plan({"X": 8, "Y": 8}, ["X", "Y"])  # X [0,1], Y [2,3]
    # Z takes the other 6 blocks; to win back the headroom, X (predicted last) leaves.
    plan = p.plan({"Z": 24}, ["Z", "Y", "X"])
    assert plan.block_tables == {"Z": (4, 5, 6, 7, 8, 9)}
    assert [(o.job_id, o.pairs) for o in plan.swap_out] == [("X", ((0, 0), (1, 1)))]
    p.ack(plan.swap_out[0].op_id)
    p.free("Z")  # 8 free
    # W takes 5 blocks; X is picked but sits in the host pool. Short of headroom, Y is offloaded,
    # and X is not uploaded in the same iteration although its 3 blocks would fit in the 3 free.
    plan = p.plan({"W": 20, "X": 9}, ["W", "X", "Y"])
    assert plan.block_tables == {"W": (4, 5, 6, 7, 8)} and plan.held == ("X",)
    assert [o.job_id for o in plan.swap_out] == ["Y"] and not plan.swap_in
    p.ack(plan.swap_out[0].op_id)
    # Nothing left to offload: X is uploaded (a picked job may use the headroom) and still skips.
    plan = p.plan({"W": 21, "X": 9}, ["W", "X", "Y"])
    assert not plan.swap_out and plan.held == ("X",)
    # Its 8 tokens come back into 2 blocks, and a third is reserved for its 9th token.
    assert [(o.job_id, o.direction, o.pairs) for o in plan.swap_in] == [("X", Direction.IN, ((0, 3), (1, 9)))]
    assert p.books.block_table("X") == (3, 9, 0)
    assert p.books.get("X").host == [0, 1]  # host blocks stay taken until the upload is acknowledged
    p.ack(plan.swap_in[0].op_id)
    plan = p.plan({"W": 21, "X": 9}, ["W", "X", "Y"])
    assert plan.block_tables == {"W": (4, 5, 6, 7, 8, 2), "X": (3, 9, 0)}
    assert p.books.get("X").host == []
