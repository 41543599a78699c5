"""The `fastserve` command: one subcommand per job, each module imported only when used."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module with main(argv) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("workers.generate", "offline in-process generation (the reference path)"),
    "profile": ("workers.profile", "measure prefill and decode iteration times, write a JSON profile"),
    "up": ("services.launcher", "start the whole stack on this machine"),
    "demo": ("services.demo", "start the stack, send a short mixed load, print a table, stop"),
    "ingress": ("services.ingress.__main__", "run the ingress process alone"),
    "http": ("services.http.__main__", "run the OpenAI-compatible HTTP front door (a client of ingress)"),
    "scheduler": ("services.scheduler.__main__", "run the scheduler process alone"),
    "kvcache": ("services.kvcache.__main__", "run the KV-cache manager process alone"),
    "worker": ("workers.__main__", "run one stage worker process alone"),
    "keys": ("services.keys", "write CURVE key files for a stack with security.curve on"),
    "sim": ("bench.sim.cli", "discrete-event simulation of the scheduling policies"),
    "loadtest": ("bench.loadtest", "open-loop load test against a running (or launched) stack"),
}


def usage() -> str:
    lines = ["usage: fastserve COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fastserve: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
