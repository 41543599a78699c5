"""An optional record of every batch the stack computed, for fitting the simulator's cost to it.

`scheduler.iteration_log = PATH` appends one JSON line per batch that computed jobs, after a header
line per scheduler start:

    {"header": 1, "policy": "fcfs", "stages": 2, "overlap": true, "epoch": ..}
    {"b": batch id, "sent": s, "ready": s, "done": s, "compute_s": s, "new": [..], "ctx": [..]}

`sent` is when the scheduler handed the batch to the KV manager, `ready` the later of that and the
return of every batch whose sampled token this one carries (overlap: it cannot start before), and
`done` when its result came back (the scheduler's monotonic clock, seconds); `compute_s` is the
workers' own forward time over all stages; `new` and `ctx` are, per job that ran, its new tokens and
the tokens already in its KV cache (0 for a prefill). `python -m bench.stack_cost --from-log` reads it (docs/SIMULATOR.md).
"""

from __future__ import annotations

import json
from typing import Any

MAX_PENDING = 256  # batches whose result never comes (a stage restarted) are dropped beyond this


class IterationLog:
    def __init__(self, path: str, header: dict[str, Any]) -> None:
        self.file = open(path, "a", buffering=1 << 16)
        self.pending: dict[int, tuple[float, set[int], dict[int, tuple[int, int]]]] = {}
        self.returned: dict[int, float] = {}  # recent batches' return times, for those that carry from them
        self.file.write(json.dumps({"header": 1, **header}) + "\n")

    def sent(self, batch_id: int, job_ids: list[int], num_new_tokens: list[int], context_lens: list[int],
             carry_from: list[int], now: float) -> None:
        if not job_ids:
            return
        if len(self.pending) >= MAX_PENDING:
            self.pending.pop(next(iter(self.pending)))
        self.pending[batch_id] = (now, {b for b in carry_from if b >= 0}, dict(zip(job_ids, zip(num_new_tokens, context_lens))))

    def done(self, batch_id: int, job_ids: list[int], compute_s: float, error: str, now: float) -> None:
        entry = self.pending.pop(batch_id, None)
        if len(self.returned) >= MAX_PENDING:
            self.returned.pop(next(iter(self.returned)))
        self.returned[batch_id] = now
        if entry is None or error or not job_ids:
            return
        sent, carried, rows = entry
        ready = max([sent, *(self.returned.get(b, sent) for b in carried)])
        ran = [rows[j] for j in job_ids if j in rows]
        self.file.write(json.dumps({"b": batch_id, "sent": round(sent, 6), "ready": round(ready, 6), "done": round(now, 6),
                                    "compute_s": round(compute_s, 6), "new": [r[0] for r in ran],
                                    "ctx": [r[1] for r in ran]}) + "\n")

    def close(self) -> None:
        self.file.close()
