"""Container health check of one process of the stack, from the shared config; exit 0 when healthy.

ingress: healthy once it answers a stats query (asked with the client keys when security.curve is on),
which it does only after the scheduler has relayed the ready handshakes of kvcache and every worker (the
stack is ready). scheduler, kvcache, worker: healthy once the process's inbox accepts TCP connections
(CURVE or not); each binds it after loading (model, host pool) and sends its ready handshake right after
binding. http: healthy once GET /health answers 200, which it does only while ingress reports the stack
ready.

    python deploy/healthcheck.py --config FILE ingress|scheduler|kvcache|worker|http [--stage K]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from typing import Any

from common import config as config_mod

ROLES = ("ingress", "scheduler", "kvcache", "worker", "http")


def inbox(config: config_mod.Config, role: str, stage: int) -> str:
    ep = config.endpoints
    return {"ingress": ep.client, "scheduler": ep.scheduler, "kvcache": ep.kvcache}.get(role) or ep.stage(stage)


def port_open(address: str, timeout: float) -> bool:
    if not address.startswith("tcp://"):
        raise ValueError(f"health checks need tcp endpoints, got {address!r}")
    host, port = address[len("tcp://"):].rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def http_ok(url: str, timeout: float) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):  # 503 while the stack starts, or nothing listening yet
        return False


async def stack_ready(address: str, timeout: float, keys: Any = None) -> bool:
    """`keys`: the client keys of a CURVE stack (common.curve.ClientKeys), None for a plain one."""
    from common.client import AsyncClient, FastServeError

    async with AsyncClient(address, timeout=timeout, keys=keys) as client:
        try:
            await client.stats()
            return True
        except FastServeError:  # unavailable while starting, or no answer within the timeout
            return False


def ingress_ready(config: config_mod.Config, address: str, timeout: float) -> bool:
    from common.curve import client_keys  # lazy, as the client: the other checks need no ZeroMQ

    return asyncio.run(stack_ready(address, timeout, client_keys(config.security)))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="healthcheck", description="health check of one stack process")
    p.add_argument("--config", required=True)
    p.add_argument("role", choices=ROLES)
    p.add_argument("--stage", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3.0, help="seconds")
    args = p.parse_args(argv)
    config = config_mod.load(args.config)
    if args.role == "http":
        _, port = config.endpoints.http_host_port()
        address = f"http://127.0.0.1:{port}/health"  # the check runs beside the process it checks
        healthy = http_ok(address, args.timeout)
    else:
        address = inbox(config, args.role, args.stage)
        healthy = ingress_ready(config, address, args.timeout) if args.role == "ingress" else port_open(address, args.timeout)
    print(f"{args.role}: {'healthy' if healthy else 'not ready'} ({address})")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
