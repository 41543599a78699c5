"""CPU one process spends per message it receives and sends on, through `common.sockets` on uvloop.

    python -m bench.message_cost [--messages 3000] [--gaps 0,0.5] [--repeats 3] [--out FILE]

An echo process reads each message from its PULL inbox and sends it back to the driver's inbox, as a
control-plane process passes a batch on. The driver sends the next message when the echo has come back,
after a gap of G ms (0: at once). The row reports the echo's thread CPU per message, the driver's, and
the round trip; the median of the repeats. With a gap, both processes sleep between messages as the
scheduler and the KV manager sleep while a model step computes, and wake with cold caches: that is the
fixed cost each of them pays per message, before any handler work (`bench.control_cost` measures the
handlers, `bench.overhead` the processes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common.messages import Ready


def _echo(inbox: str, reply_to: str, messages: int, results: Any) -> None:
    import uvloop

    from common import sockets

    async def main() -> None:
        ctx = sockets.context()
        pull, push = sockets.bind_inbox(ctx, inbox), sockets.connect_push(ctx, reply_to)
        results.put("up")
        await sockets.recv(pull)  # the first message starts the clock
        await sockets.send(push, Ready("echo", 0))
        start = time.thread_time()
        for _ in range(messages):
            await sockets.send(push, await sockets.recv(pull))
        results.put(time.thread_time() - start)
        pull.close(linger=0)
        push.close(linger=0)

    uvloop.run(main())


def one_run(messages: int, gap_ms: float) -> dict[str, float]:
    import uvloop

    from common import sockets

    with tempfile.TemporaryDirectory() as tmp:
        there, back = f"ipc://{tmp}/echo", f"ipc://{tmp}/driver"
        results: Any = mp.get_context("spawn").Queue()
        echo = mp.get_context("spawn").Process(target=_echo, args=(there, back, messages, results))
        echo.start()
        results.get(timeout=60)

        async def drive() -> tuple[float, float]:
            ctx = sockets.context()
            pull, push = sockets.bind_inbox(ctx, back), sockets.connect_push(ctx, there)
            await sockets.send(push, Ready("driver", -1))
            await sockets.recv(pull)
            wall, cpu = 0.0, time.thread_time()
            for k in range(messages):
                if gap_ms:
                    time.sleep(gap_ms / 1e3)
                start = time.perf_counter()
                await sockets.send(push, Ready("driver", k))
                await sockets.recv(pull)
                wall += time.perf_counter() - start
            cpu = time.thread_time() - cpu
            pull.close(linger=0)
            push.close(linger=0)
            return wall, cpu

        wall, driver_cpu = uvloop.run(drive())
        echo_cpu = results.get(timeout=60)
        echo.join(timeout=30)
    return {"echo_cpu_us": echo_cpu / messages * 1e6, "driver_cpu_us": driver_cpu / messages * 1e6,
            "round_trip_us": wall / messages * 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.message_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--gaps", default="0,0.5", help="ms between messages, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="results JSON")
    args = parser.parse_args(argv)
    rows = []
    for gap in [float(g) for g in args.gaps.split(",")]:
        runs = [one_run(args.messages, gap) for _ in range(args.repeats)]
        row = {"gap_ms": gap, **{k: statistics.median(r[k] for r in runs) for k in runs[0]}, "runs": runs}
        rows.append(row)
        print(f"gap {gap:g} ms: echo CPU {row['echo_cpu_us']:.0f} us per message, driver {row['driver_cpu_us']:.0f} us, "
              f"round trip {row['round_trip_us']:.0f} us (median of {args.repeats})", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"messages": args.messages, "repeats": args.repeats, "rows": rows},
                                             indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
