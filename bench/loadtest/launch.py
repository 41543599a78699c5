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


def on_free_ports(config: config_mod.Config, http: bool = False) -> config_mod.Config:
    """The config with every endpoint the user left at its default on a free loopback port, so stacks never
    collide; an endpoint the user set is kept. The HTTP front door runs when `http` is asked for (on a free
    port unless endpoints.http is set) or when endpoints.http is set; otherwise the stack runs without it."""
    default, ep = config_mod.Endpoints(), config.endpoints
    names = [n for n in ("client", "ingress", "scheduler", "kvcache") if getattr(ep, n) == getattr(default, n)]
    own_stages = not ep.stages and "kvcache" in names  # stage ports follow a kvcache address the user set
    ports = iter(free_ports(len(names) + (config.parallel.num_stages if own_stages else 0) + 1))
    changes: dict = {n: f"tcp://127.0.0.1:{next(ports)}" for n in names}
    if own_stages:
        changes["stages"] = tuple(f"tcp://127.0.0.1:{next(ports)}" for _ in range(config.parallel.num_stages))
    if ep.http == default.http:
        changes["http"] = f"127.0.0.1:{next(ports)}" if http else ""
    return config.replace(endpoints=changes)


class LaunchedStack:
    """A running stack; `guard(coro)` runs client work but fails fast if any process of the stack dies."""

    def __init__(self, launcher: Launcher) -> None:
        self.launcher = launcher
        self.config = launcher.config  # as launched: the endpoints it really uses
        self.endpoint = launcher.endpoint()
        self.base_url = f"http://{self.config.endpoints.http}" if self.config.endpoints.http else ""

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
async def launched(config: config_mod.Config, log_level: str = "warning",
                   http: bool = False) -> AsyncIterator[LaunchedStack]:
    """Start every process of the stack (the HTTP front door too with `http`), wait for their ready
    handshakes, yield, then stop them all."""
    launcher = Launcher(on_free_ports(config, http), log_level, quiet=True)
    try:
        try:
            await launcher.start()
        except RuntimeError as e:
            raise StackFailed(f"the stack did not start: {e}") from None
        yield LaunchedStack(launcher)
    finally:
        await launcher.stop()
