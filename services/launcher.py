"""`fastserve up`: start the whole stack on this machine, wait for every ready handshake, supervise it.

Every process is a child started with the same config file (written once by the launcher), exactly as
it would be started alone or by docker-compose. The launcher binds a control inbox where children
announce Ready; when a child dies it tells the scheduler and ingress (so every live request ends with
`internal`), waits for ingress to confirm, stops the rest and exits non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import ctypes
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import config as config_mod
from common import sockets
from common.codec import DecodeError
from common.messages import Exit, Ready
from common.model.spec import TINY

READY_TIMEOUT_S = 300.0  # model loading on a slow machine; a stack that is not up by then failed
DRAIN_TIMEOUT_S = 5.0  # time ingress gets to tell clients before the stack is stopped
STOP_TIMEOUT_S = 10.0  # SIGTERM grace before SIGKILL


@dataclass
class Child:
    role: str
    stage: int
    proc: Any  # asyncio.subprocess.Process

    @property
    def name(self) -> str:
        return self.role if self.stage < 0 else f"{self.role}{self.stage}"


def child_commands(config_path: str, num_stages: int, log_level: str, http: bool = True) -> list[tuple[str, int, list[str]]]:
    """(role, stage, argv) of every process of the stack; workers first so stage inboxes bind early;
    the HTTP front door last (it is a client of ingress), unless endpoints.http is empty."""
    base = [sys.executable, "-m", "services.cli"]
    opts = ["--config", config_path, "--log-level", log_level]
    cmds = [("worker", k, [*base, "worker", *opts, "--stage", str(k)]) for k in range(num_stages)]
    roles = ("kvcache", "scheduler", "ingress", "http") if http else ("kvcache", "scheduler", "ingress")
    cmds += [(role, -1, [*base, role, *opts]) for role in roles]
    return cmds


class ProfileFailed(RuntimeError):
    """The one-time profile of the model could not be measured (the profile run printed why)."""


def cached_profile(config: config_mod.Config) -> str:
    """Path of an iteration-time profile for this model and layout, measured once per machine.

    Skip-join needs each job's first-iteration time; `scheduler.profile = "auto"` (the default)
    measures it with `fastserve profile` the first time a stack of this shape starts and keeps it in
    the user's cache directory (FASTSERVE_CACHE or ~/.cache/fastserve).
    """
    m = config.model
    p = config.parallel
    threads = [p.cpu_threads, p.control_cpus] if p.cpu_threads or p.control_cpus else []  # the step's cores
    key = json.dumps([str(Path(m.path).resolve()) if m.path != TINY else TINY, m.seed, m.dtype, m.device,
                      m.max_context, config.cache.block_size, p.num_stages, *threads])
    cache = config_mod.cache_dir()
    path = cache / f"profile-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        overrides = [f"model.{k}={v}" for k, v in (("path", m.path), ("seed", m.seed), ("dtype", m.dtype),
                                                     ("device", m.device), ("max_context", m.max_context))]
        overrides += [f"cache.block_size={config.cache.block_size}", f"parallel.num_stages={p.num_stages}",
                      f"parallel.cpu_threads={p.cpu_threads}", f"parallel.control_cpus={p.control_cpus}"]
        argv = [sys.executable, "-m", "services.cli", "profile", "--out", str(tmp),
                "--input-lens", "16,64,256,1024", "--batch-sizes", "1,8,32", "--context-lens", "64,512", "--repeats", "2"]
        argv += [item for o in overrides for item in ("--set", o)]
        try:
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        except subprocess.CalledProcessError as e:
            tmp.unlink(missing_ok=True)
            raise ProfileFailed(f"profiling the model for skip-join failed (exit {e.returncode}; the line above says why); "
                                "fix that, or set scheduler.profile to a profile file, or to \"\" to run without one") from None
        tmp.replace(path)  # atomic: concurrent launches never read half a file
    return str(path)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """In a child before exec: SIGTERM it when the launcher dies, even by SIGKILL, so no process of the
    stack runs on unsupervised (Linux; elsewhere the launcher's own shutdown is the only guard)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Launcher:
    def __init__(self, config: config_mod.Config, log_level: str = "info", quiet: bool = False) -> None:
        profile = config.scheduler.profile  # first: a profile that cannot be made leaves nothing behind
        if profile == "auto":
            profile = cached_profile(config) if config.scheduler.policy == "skip-join-mlfq" else ""
        self.run_dir = Path(tempfile.mkdtemp(prefix="fastserve-"))
        control = f"ipc://{self.run_dir}/control"
        # A unique pool name keeps concurrent stacks apart; a name the user chose is theirs to keep.
        default_pool = config_mod.Endpoints().host_pool
        pool = config.endpoints.host_pool
        if pool == default_pool:
            pool = f"fastserve_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        config = config.replace(scheduler={"profile": profile})
        # The token makes the launcher's Exit the only one its children honour (the config file is private to
        # the run directory); the pool is the stack's, and the launcher removes it when the stack stops.
        self.config = config.replace(endpoints={"control": control, "host_pool": pool,
                                                "control_token": secrets.token_hex(16)})
        self.config_path = self.run_dir / "config.toml"
        self.config_path.write_text(config_mod.dumps(self.config))
        self.log_level = log_level
        self.quiet = quiet
        self.children: list[Child] = []
        sockets.secure(self.config.security)  # CURVE like its children: the control inbox, the drain's Exits
        self.ctx = sockets.context()
        self.control = sockets.bind_inbox(self.ctx, control)
        self.failed: Child | None = None

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"fastserve: {text}", file=sys.stderr, flush=True)

    async def start(self) -> None:
        """Spawn every child and wait for all ready handshakes (and the stack's own)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for role, stage, argv in child_commands(str(self.config_path), self.config.parallel.num_stages, self.log_level,
                                                bool(self.config.endpoints.http)):
            proc = await asyncio.create_subprocess_exec(*argv, env=env, start_new_session=True, preexec_fn=die_with_parent)
            self.children.append(Child(role, stage, proc))
        expected = {(c.role, c.stage) for c in self.children} | {("stack", -1)}
        seen: set[tuple[str, int]] = set()
        deaths = {asyncio.ensure_future(c.proc.wait()): c for c in self.children}
        deadline = asyncio.get_running_loop().time() + READY_TIMEOUT_S
        try:
            while not expected <= seen:
                recv = asyncio.ensure_future(sockets.recv(self.control, (Ready, Exit)))
                timeout = deadline - asyncio.get_running_loop().time()
                done, _ = await asyncio.wait({recv, *deaths}, timeout=max(timeout, 0), return_when=asyncio.FIRST_COMPLETED)
                if recv not in done:
                    recv.cancel()
                for task in done & set(deaths):
                    self.failed = deaths[task]
                    raise RuntimeError(f"{self.failed.name} exited with {task.result()} before the stack was ready")
                if not done:
                    raise RuntimeError(f"the stack was not ready after {READY_TIMEOUT_S:.0f} s; missing {expected - seen}")
                msg = recv.result()
                if isinstance(msg, Ready):
                    seen.add((msg.role, msg.stage))
        finally:
            for task in deaths:
                task.cancel()

    async def supervise(self) -> int:
        """Wait until a child exits (failure) or the launcher is told to stop; returns the exit status."""
        deaths = {asyncio.ensure_future(c.proc.wait()): c for c in self.children}
        stop = asyncio.get_running_loop().create_future()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
        done, _ = await asyncio.wait({stop, *deaths}, return_when=asyncio.FIRST_COMPLETED)
        for task in deaths:
            if task not in done:
                task.cancel()
        if stop in done:
            self.say("stopping")
            return 0
        task = next(iter(done))
        self.failed = deaths[task]
        code = task.result()
        self.say(f"{self.failed.name} exited with {code}; failing live requests and stopping the stack")
        await self.drain(Exit(self.failed.role, self.failed.stage, code if code is not None else -1,
                              self.config.endpoints.control_token))
        return 1

    async def drain(self, exit_msg: Exit) -> None:
        """Tell the scheduler and ingress a peer died; wait (bounded) for ingress to confirm."""
        ep = self.config.endpoints
        peers = [sockets.connect_push(self.ctx, addr) for addr in (ep.scheduler, ep.kvcache, ep.ingress)]
        try:
            for sock in peers:
                await sockets.send(sock, exit_msg)
            deadline = asyncio.get_running_loop().time() + DRAIN_TIMEOUT_S
            while (left := deadline - asyncio.get_running_loop().time()) > 0:
                try:
                    msg = await asyncio.wait_for(sockets.recv(self.control, (Ready, Exit)), left)
                except asyncio.TimeoutError:
                    break
                if isinstance(msg, Exit) and msg.role == "ingress":
                    break
                if isinstance(msg, DecodeError):
                    continue
        finally:
            for sock in peers:
                sock.close(linger=0)

    async def stop(self) -> None:
        """SIGTERM every live child, SIGKILL the ones still alive after the grace period."""
        live = [c for c in self.children if c.proc.returncode is None]
        for child in live:
            try:
                child.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        if live:
            _, pending = await asyncio.wait([asyncio.ensure_future(c.proc.wait()) for c in live], timeout=STOP_TIMEOUT_S)
            for child in live:
                if child.proc.returncode is None:
                    child.proc.kill()
                    await child.proc.wait()
        self.control.close(linger=0)
        shutil.rmtree(self.run_dir, ignore_errors=True)  # the config copy and the control socket
        from common.hostpool import HostPool

        HostPool.remove(self.config.endpoints.host_pool)

    def endpoint(self) -> str:
        return self.config.endpoints.client


async def launch(config: config_mod.Config, log_level: str) -> int:
    try:
        launcher = Launcher(config, log_level)
    except (ProfileFailed, config_mod.ConfigError) as e:  # no profile, or unreadable CURVE keys
        print(f"fastserve up: {e}", file=sys.stderr)
        return 1
    try:
        try:
            await launcher.start()
        except RuntimeError as e:
            launcher.say(str(e))
            return 1
        launcher.say(f"stack ready: {config.parallel.num_stages} stage(s), policy {config.scheduler.policy}")
        if config.endpoints.http:
            launcher.say(f"OpenAI-compatible API on http://{config.endpoints.http}/v1")
        print(launcher.endpoint(), flush=True)
        return await launcher.supervise()
    finally:
        await launcher.stop()


def build_parser(prog: str = "fastserve up") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="start the whole stack on this machine")
    parser.add_argument("--config", help="TOML config file (defaults when omitted)")
    parser.add_argument("--model", help="'smollm2-135m' (the default), 'tiny' (seeded random) or a Hugging Face checkpoint directory")
    parser.add_argument("--stages", type=int, help="pipeline stages (one worker process each)")
    parser.add_argument("--policy", help="scheduling policy")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a value")
    parser.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    return parser


def config_from_args(args: argparse.Namespace) -> config_mod.Config:
    overrides = list(args.set)
    if args.model:
        overrides.append(f"model.path={args.model}")
    if args.stages is not None:
        overrides.append(f"parallel.num_stages={args.stages}")
    if args.policy:
        overrides.append(f"scheduler.policy={args.policy}")
    return config_mod.load(args.config, overrides)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except config_mod.ConfigError as e:
        print(f"fastserve up: {e}", file=sys.stderr)
        return 2
    import uvloop

    return uvloop.run(launch(config, args.log_level))
