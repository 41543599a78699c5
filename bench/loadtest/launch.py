"""Start a stack for one policy on free loopback ports (the `fastserve up` launcher, in process), stop it after."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import AsyncIterator, Awaitable, TypeVar

from common import config as config_mod
from services.launcher import Launcher

T = TypeVar("T")


class StackFailed(RuntimeError):
    """A process of the launched stack exited while the load ran (or it never became ready)."""


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def on_free_ports(config: config_mod.Config) -> config_mod.Config:
    """The config with every tcp endpoint on a free loopback port, so stacks never collide."""
    stages = config.parallel.num_stages
    ports = free_ports(4 + stages)
    addr = [f"tcp://127.0.0.1:{p}" for p in ports]
    # the load tester speaks ZeroMQ: no HTTP front door, so no fixed HTTP port to collide on
    return config.replace(endpoints={"client": addr[0], "ingress": addr[1], "scheduler": addr[2],
                                     "kvcache": addr[3], "stages": tuple(addr[4:]), "bind_any": False, "http": ""})


class LaunchedStack:
    """A running stack; `guard(coro)` runs client work but fails fast if any process of the stack dies."""

    def __init__(self, launcher: Launcher) -> None:
        self.launcher = launcher
        self.endpoint = launcher.endpoint()

    async def guard(self, work: Awaitable[T]) -> T:
        job = asyncio.ensure_future(work)
        deaths = {asyncio.ensure_future(c.proc.wait()): c for c in self.launcher.children}
        try:
            done, _ = await asyncio.wait({job, *deaths}, return_when=asyncio.FIRST_COMPLETED)
            if job in done:
                return job.result()
            dead = deaths[next(t for t in done if t in deaths)]
            job.cancel()
            await asyncio.gather(job, return_exceptions=True)
            raise StackFailed(f"{dead.name} exited with {dead.proc.returncode} during the load test")
        finally:
            for task in deaths:
                task.cancel()


@contextlib.asynccontextmanager
async def launched(config: config_mod.Config, log_level: str = "warning") -> AsyncIterator[LaunchedStack]:
    """Start every process of the stack, wait for their ready handshakes, yield, then stop them all."""
    launcher = Launcher(on_free_ports(config), log_level, quiet=True)
    try:
        try:
            await launcher.start()
        except RuntimeError as e:
            raise StackFailed(f"the stack did not start: {e}") from None
        yield LaunchedStack(launcher)
    finally:
        await launcher.stop()
