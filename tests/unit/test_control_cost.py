"""bench.control_cost drives the real handlers through decode iterations without sockets."""

from __future__ import annotations

import asyncio

import bench.control_cost as control_cost
from bench.control_cost import ROLES, main, one_run


def test_every_handler_is_timed_over_the_iterations(tmp_path, capsys, monkeypatch):
    spent = asyncio.run(one_run(batch=4, policy="skip-join-mlfq", iterations=5))
    assert all(spent[role] > 0 for role in ROLES)
    assert spent["client_messages_per_iteration"] == 1  # four streams, one TokenEvents per step
    # main() configures logging for the process; here that would bind pytest's captured stderr for good
    monkeypatch.setattr(control_cost, "setup_logging", lambda *a, **k: None)
    out = tmp_path / "cost.json"
    assert main(["--batches", "2", "--iterations", "3", "--repeats", "2", "--out", str(out)]) == 0
    assert "batch   2:" in capsys.readouterr().out and out.stat().st_size > 0
