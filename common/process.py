"""The shape every process entry shares: parse --config/--set, set up logging, run the loop, exit code."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any, Awaitable, Callable

from common import affinity
from common import config as config_mod
from common import sockets
from common.log import setup_logging


def parse(prog: str, description: str, argv: list[str], stage: bool = False) -> tuple[Any, config_mod.Config]:
    """Common options of a process entry, and the process's socket security (every entry makes its sockets
    after this); exits with status 2 and one line on a bad config or unreadable keys."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="TOML config file (defaults when omitted)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a value")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    if stage:
        parser.add_argument("--stage", type=int, required=True, help="pipeline stage index of this worker")
    args = parser.parse_args(argv)
    try:
        config = config_mod.load(args.config, args.set)
        sockets.secure(config.security)
        affinity.pin(config.parallel, prog.split()[-1], args.stage if stage else -1)
    except config_mod.ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if stage and not 0 <= args.stage < config.parallel.num_stages:
        print(f"{prog}: --stage {args.stage} is outside 0..{config.parallel.num_stages - 1}", file=sys.stderr)
        raise SystemExit(2)
    return args, config


def run_process(role: str, serve: Callable[[], Awaitable[None]], stage: int | None = None, log_level: str = "info") -> int:
    """Run `serve()` on uvloop until it returns or SIGTERM/SIGINT; a crash is logged and exits 1."""
    log = setup_logging(role, stage, log_level)

    async def main() -> None:
        task = asyncio.ensure_future(serve())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            log.info("stopped", reason="signal")

    try:
        import uvloop

        uvloop.run(main())
    except Exception:  # process boundary: log the cause and exit non-zero
        log.exception("crashed")
        return 1
    return 0


def run_service(role: str, build: Callable[[], Any], stage: int | None = None, log_level: str = "info") -> int:
    """Build a service (its `from_config`), run its loop, and close its sockets however the loop ends."""

    async def serve() -> None:
        service = build()
        try:
            await service.run()
        finally:
            service.close()

    return run_process(role, serve, stage, log_level)
