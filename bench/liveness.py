"""Time from a process's death to its clients' errors, with the processes run alone (as compose runs them).

    python -m bench.liveness --repeats 3 --out bench/results/liveness.json

For each of scheduler, kvcache and the last worker: start every process of a 2-stage tiny stack alone,
start 6 long requests, SIGKILL the process once tokens flow, and time each request's end (its error code
and the seconds since the kill); then restart the process and time until the stack serves a request
again. `liveness.timeout_s` is the config's (default 3 s) unless `--set` changes it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench.loadtest.launch import free_ports
from common import config as config_mod
from common.client import AsyncClient, FastServeError
from common.hostpool import HostPool

ROOT = Path(__file__).resolve().parents[1]


class Alone:
    """Every process of a stack started on its own from one config file, on free loopback ports (the tiny
    model unless the overrides name another); `stop` also removes the stack's host pool."""

    def __init__(self, overrides: list[str], num_stages: int = 2, workdir: Path | None = None,
                 log_level: str = "error") -> None:
        self.dir = workdir or Path(tempfile.mkdtemp(prefix="fastserve-alone-"))
        ports = free_ports(4 + num_stages)
        names = ("client", "ingress", "scheduler", "kvcache")
        base = [f"endpoints.{n}=tcp://127.0.0.1:{p}" for n, p in zip(names, ports)]
        base += ["endpoints.stages=" + ",".join(f"tcp://127.0.0.1:{p}" for p in ports[4:]), "endpoints.http=",
                 f"endpoints.host_pool=fastserve_alone_{uuid.uuid4().hex[:8]}", "model.path=tiny",
                 f"parallel.num_stages={num_stages}", "scheduler.profile="]
        self.config = config_mod.load(None, [*base, *overrides])
        self.config_path = self.dir / "config.toml"
        self.config_path.write_text(config_mod.dumps(self.config))
        self.endpoint = self.config.endpoints.client
        self.log_level = log_level
        self.procs: dict[tuple[str, int], subprocess.Popen] = {}

    def start(self, role: str, stage: int = -1) -> None:
        args = [sys.executable, "-m", "services.cli", role, "--config", str(self.config_path), "--log-level", self.log_level]
        args += ["--stage", str(stage)] if stage >= 0 else []
        self.procs[(role, stage)] = subprocess.Popen(args, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def start_all(self) -> None:
        for k in range(self.config.parallel.num_stages):
            self.start("worker", k)
        for role in ("kvcache", "scheduler", "ingress"):
            self.start(role)

    def kill(self, role: str, stage: int = -1) -> None:
        proc = self.procs.pop((role, stage))
        proc.kill()
        proc.wait(30)

    def stop(self) -> dict[tuple[str, int], int]:
        """SIGINT every process; their exit codes (a process that does not stop in 30 s is killed)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        codes = {}
        for key, proc in self.procs.items():
            try:
                codes[key] = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[key] = proc.wait()
        HostPool.remove(self.config.endpoints.host_pool)  # run alone, the pool outlives every process
        return codes


async def ended(task: asyncio.Task, killed: list[float]) -> tuple[str, float]:
    try:
        await task
        code = "ok"
    except FastServeError as e:
        code = e.code
    return code, round(time.monotonic() - killed[0], 3)


SERVING = ["ingress.client_lease_s=0", "cache.num_gpu_blocks=160", "cache.num_host_blocks=512"]


async def one_kill(role: str, stage: int, overrides: list[str]) -> dict:
    stack = Alone([*SERVING, *overrides])
    try:
        stack.start_all()
        async with AsyncClient(stack.endpoint, timeout=300) as client:
            await client.wait_ready(timeout=120)
            killed = [0.0]
            tasks = [asyncio.create_task(client.generate(prompt_ids=[5 + i, 7], max_tokens=600, ignore_eos=True))
                     for i in range(6)]
            ends = [asyncio.create_task(ended(t, killed)) for t in tasks]
            while (await client.stats())["tokens_generated"] < 50:
                await asyncio.sleep(0.02)
            killed[0] = time.monotonic()
            stack.kill(role, stage)
            outcomes = await asyncio.wait_for(asyncio.gather(*ends), 120)
            stack.start(role, stage)
            restarted = time.monotonic()
            while True:  # until a request is served again
                try:
                    await client.generate(prompt_ids=[1, 2], max_tokens=2)
                    break
                except FastServeError:
                    await asyncio.sleep(0.1)
            back_s = time.monotonic() - restarted
            stats = await client.stats()
    finally:
        stack.stop()
    return {"role": role if stage < 0 else f"{role}{stage}", "outcomes": outcomes,
            "death_to_error_max_s": max(s for _, s in outcomes), "restart_to_service_s": round(back_s, 3),
            "timeout_s": stack.config.liveness.timeout_s, "kv_whole_after": int(stats["kv_whole"])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.liveness", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--out")
    args = p.parse_args(argv)
    runs = []
    for role, stage in (("scheduler", -1), ("kvcache", -1), ("worker", 1)):
        for _ in range(args.repeats):
            runs.append(asyncio.run(one_kill(role, stage, args.set)))
    print("| killed | requests' end codes | death to error, max s | restart to service s | timeout_s |")
    print("|---|---|---|---|---|")
    for r in runs:
        codes = sorted({c for c, _ in r["outcomes"]})
        print(f"| {r['role']} | {', '.join(codes)} | {r['death_to_error_max_s']} | {r['restart_to_service_s']} | "
              f"{r['timeout_s']:g} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
