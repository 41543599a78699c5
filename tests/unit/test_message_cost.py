"""bench.message_cost echoes messages through a second process and times both ends."""

from __future__ import annotations

import json

from bench.message_cost import main


def test_each_gap_gets_a_row_with_the_echo_and_driver_cpu(tmp_path, capsys):
    out = tmp_path / "cost.json"
    assert main(["--messages", "40", "--gaps", "0,0.2", "--repeats", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["gap_ms"] for r in rows] == [0.0, 0.2]
    for row in rows:
        assert row["echo_cpu_us"] > 0 and row["driver_cpu_us"] > 0
        assert row["round_trip_us"] > 0
        assert len(row["runs"]) == 1
    assert "gap 0.2 ms: echo CPU" in capsys.readouterr().out
