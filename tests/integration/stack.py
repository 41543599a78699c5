"""Start and stop a whole stack (`fastserve up`) as a child process on free loopback ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from bench.liveness import Alone
from bench.loadtest.launch import free_ports

ROOT = Path(__file__).resolve().parents[2]
# Test stacks serve the built-in tiny model (it loads at once); an override may name another
TINY_MODEL = "model.path=tiny"


def local_overrides(num_stages: int) -> list[str]:
    """Endpoints on free loopback ports (stage inboxes included)."""
    ports = free_ports(5 + num_stages)
    names = ("client", "ingress", "scheduler", "kvcache")
    addrs = [f"endpoints.{n}=tcp://127.0.0.1:{p}" for n, p in zip(names, ports)]
    stages = ",".join(f"tcp://127.0.0.1:{p}" for p in ports[5:])
    return [*addrs, f"endpoints.http=127.0.0.1:{ports[4]}", f"endpoints.stages={stages}", f"parallel.num_stages={num_stages}"]


def local_overrides_of(args: list[str]) -> list[str]:
    """The --set values of a command line, last one winning per key."""
    values = {}
    for flag, value in zip(args, args[1:]):
        if flag == "--set":
            values[value.split("=", 1)[0]] = value
    return list(values.values())


class Stack:
    """`fastserve up` on the tiny model with the given overrides; `endpoint` is what it printed once ready."""

    def __init__(self, overrides: list[str] = (), num_stages: int = 2, ready_timeout: float = 180.0) -> None:
        args = [sys.executable, "-m", "services.cli", "up", "--log-level", "warning"]
        for item in [TINY_MODEL, *local_overrides(num_stages), *overrides]:
            args += ["--set", item]
        self.log_lines: list[str] = []
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()
        line = self._readline(ready_timeout)
        if not line.startswith("tcp://"):
            self.stop()
            raise RuntimeError(f"stack did not start: {line!r}\n" + "".join(self.log_lines[-40:]))
        self.endpoint = line.strip()
        http = next((o.split("=", 1)[1] for o in [*local_overrides_of(args)] if o.startswith("endpoints.http=")), "")
        self.http = f"http://{http}" if http else ""  # base URL of the OpenAI-compatible front door

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            self.log_lines.append(line)

    def _readline(self, timeout: float) -> str:
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        return result[0] if result else ""

    def worker_pids(self) -> list[int]:
        """Pids of this stack's stage workers (children of the launcher)."""
        return self.pids_of("worker")

    def pids_of(self, role: str) -> list[int]:
        """Pids of this stack's processes of one role ("ingress", "scheduler", "kvcache", "worker", "http")."""
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid), "-f", f"services.cli {role}"],
                             capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def wait(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


class Processes(Alone):
    """Every process of a stack started alone (as docker-compose or a multi-host setup runs them), with a
    control inbox at `control` for the test to hear their ready handshakes."""

    def __init__(self, tmp_dir: Path, overrides: list[str] = (), num_stages: int = 2) -> None:
        self.control = f"ipc://{tmp_dir}/control"
        super().__init__([TINY_MODEL, f"endpoints.control={self.control}", *overrides], num_stages, tmp_dir,
                         log_level="warning")
