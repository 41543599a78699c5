"""`fastserve http`: the OpenAI-compatible HTTP front door, a client of ingress (docs/HTTP.md)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from typing import Any, Iterator

import prometheus_client
import uvicorn

from common import config as config_mod
from common import sockets
from common.log import get_logger
from common.messages import Ready
from common.process import parse, run_process
from services.http.app import create_app
from services.http.front import FrontDoor

SHUTDOWN_GRACE_S = 5.0  # open streams get this long to finish when the process is told to stop


def run_http(config: config_mod.Config, log_level: str = "info") -> int:
    """Serve HTTP on endpoints.http until SIGINT/SIGTERM; a crash is logged and exits 1."""
    return run_process("http", lambda: serve(config, log_level), log_level=log_level)


async def serve(config: config_mod.Config, log_level: str = "info") -> None:
    log = get_logger()
    prometheus_client.disable_created_metrics()  # no `_created` series: vLLM's exposition has none either
    front = FrontDoor.from_config(config)
    host, port = config.endpoints.http_host_port()
    listener = _listen("0.0.0.0" if config.endpoints.bind_any else host, port)
    server = _Server(uvicorn.Config(create_app(front), log_config=None, access_log=False, lifespan="off",
                                    log_level=log_level, timeout_graceful_shutdown=SHUTDOWN_GRACE_S))
    task = asyncio.ensure_future(server.serve(sockets=[listener]))
    try:
        await _announce(config, log, listener)
        await asyncio.shield(task)
    except asyncio.CancelledError:  # SIGINT/SIGTERM (run_process cancels us): let uvicorn close its connections
        server.should_exit = True
        await task
        raise
    finally:
        listener.close()
        await front.close()


class _Server(uvicorn.Server):
    """uvicorn's Server without its signal handlers: run_process owns SIGINT/SIGTERM in every process."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _listen(host: str, port: int) -> socket.socket:
    """Bind here rather than in uvicorn, so a taken port fails this process with the cause logged."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


async def _announce(config: config_mod.Config, log: Any, listener: socket.socket) -> None:
    """Log the address and tell the launcher (when there is one) that this process is up."""
    host, port = listener.getsockname()[:2]
    log.info("http_ready", address=f"http://{host}:{port}", model=config.model.path, client=config.endpoints.client)
    if config.endpoints.control:
        control = sockets.connect_push(sockets.context(), config.endpoints.control)
        try:
            await sockets.send(control, Ready("http", -1))
        finally:
            control.close(linger=1000)  # linger: the Ready must leave before the socket goes


def main(argv: list[str]) -> int:
    args, config = parse("fastserve http", "run the OpenAI-compatible HTTP front door", argv)
    return run_http(config, args.log_level)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
