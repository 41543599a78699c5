"""docker-compose.yml describes a working stack: it validates, and its services run as local processes.

The local run takes each service of the `cpu` profile with the compose file's own entrypoint, command,
environment, start order and health checks, and the mounted config with every service hostname mapped to
127.0.0.1 (each address on a free port, so the run never collides with another stack on this machine).
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from bench import workloads
from bench.loadtest.driver import run_load, zmq_backend
from bench.loadtest.plan import make_plan
from common import config as config_mod
from common.client import Client, RequestTimeout
from common.curve import client_keys, make_keys
from stack import free_ports

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
CONTAINER_CONFIG = "/etc/fastserve/config.toml"
CONTAINER_KEYS = "/etc/fastserve/keys"
ADDRESS = re.compile(r'tcp://([A-Za-z0-9_.-]+):(\d+)')


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def services_of(profile: str) -> dict[str, dict]:
    return {name: svc for name, svc in compose()["services"].items() if not svc.get("profiles") or profile in svc["profiles"]}


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed (apt-get install docker-compose)")
@pytest.mark.parametrize("profile", ["cpu", "gpu"], ids=["cpu-profile", "cuda-profile"])  # "gpu" would mark it CUDA-only
def test_compose_file_passes_docker_compose_config(profile):
    out = subprocess.run(["docker-compose", "-f", str(COMPOSE), "--profile", profile, "config"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    rendered = yaml.safe_load(out.stdout)["services"]
    assert rendered["ingress"]["ports"][0]["target"] == 5555
    assert rendered["kvcache"]["ipc"] == "shareable"
    assert rendered["worker1-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_compose_services_and_mounts():
    cpu, gpu = services_of("cpu"), services_of("gpu")
    assert sorted(cpu) == ["http", "ingress", "kvcache", "scheduler", "worker0", "worker1"]
    assert sorted(gpu) == ["http", "ingress", "kvcache", "scheduler", "worker0-gpu", "worker1-gpu"]
    for svc in cpu.values():
        assert any(v.endswith(f":{CONTAINER_CONFIG}:ro") for v in svc["volumes"])  # one shared config
        assert f"./deploy/keys:{CONTAINER_KEYS}:ro" in svc["volumes"]  # and the CURVE keys it names
        assert "test" in svc["healthcheck"]
    for name in ("worker0-gpu", "worker1-gpu"):
        assert gpu[name]["ipc"] == "service:kvcache" and gpu[name]["deploy"]["resources"]["reservations"]["devices"]


def local_config(tmp_path: Path, service_names: set[str]) -> Path:
    """The mounted config with every `tcp://SERVICE:PORT` on 127.0.0.1 and a free port, its own host pool, the
    tiny model, and CURVE keys made as `fastserve keys deploy/keys` makes them before `docker-compose up`."""
    mount = next(v for v in compose()["services"]["ingress"]["volumes"] if v.split(":")[1] == CONTAINER_CONFIG)
    text = (ROOT / mount.split(":")[0]).read_text()
    found = sorted(set(ADDRESS.findall(text)))
    assert {host for host, _ in found} <= service_names, f"config names hosts that are not services: {found}"
    ports = dict(zip(found, free_ports(len(found))))
    text = ADDRESS.sub(lambda m: f"tcp://127.0.0.1:{ports[(m.group(1), m.group(2))]}", text)
    text = re.sub(r'host_pool = "[^"]*"', f'host_pool = "fastserve_compose_{uuid.uuid4().hex[:8]}"', text)
    text = re.sub(r'^http = "[^"]*"', f'http = "127.0.0.1:{free_ports(1)[0]}"', text, flags=re.M)
    text = re.sub(r'^path = "[^"]*"', 'path = "tiny"', text, flags=re.M)  # the wiring, not SmolLM2's load time
    assert f'keys_dir = "{CONTAINER_KEYS}"' in text  # the config names the mounted keys
    make_keys(tmp_path / "keys")
    text = text.replace(f'keys_dir = "{CONTAINER_KEYS}"', f'keys_dir = "{tmp_path / "keys"}"')
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def local_argv(argv: list[str], config: Path) -> list[str]:
    """A container command line as a local one: `fastserve`/`python` from this venv, the local config."""
    head = {"fastserve": [sys.executable, "-m", "services.cli"], "python": [sys.executable]}
    out = list(head.get(argv[0], [argv[0]])) + argv[1:]
    return [str(config) if a == CONTAINER_CONFIG else a for a in out]


def start_order(services: dict[str, dict]) -> list[str]:
    order: list[str] = []
    while len(order) < len(services):
        ready = [n for n, s in services.items() if n not in order and set(s.get("depends_on", {})) <= set(order)]
        assert ready, "depends_on has a cycle"
        order += ready
    return order


def wait_healthy(name: str, svc: dict, config: Path, procs: dict, timeout: float = 180.0) -> None:
    argv = local_argv(svc["healthcheck"]["test"][1:], config)  # drop "CMD"
    deadline = time.monotonic() + timeout
    while True:
        dead = {n: p.returncode for n, p in procs.items() if p.poll() is not None}
        assert not dead, f"service(s) exited before {name} was healthy: {dead}"
        if subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=30).returncode == 0:
            return
        assert time.monotonic() < deadline, f"{name} was not healthy within {timeout} s"
        time.sleep(0.5)  # the health check's own retry interval, as the container engine would run it


@pytest.mark.slow
def test_compose_services_as_local_processes_serve_requests(tmp_path):
    services = services_of("cpu")
    config = local_config(tmp_path, set(compose()["services"]) | {"worker0", "worker1"})
    procs: dict[str, subprocess.Popen] = {}
    logs = {}
    try:
        for name in start_order(services):
            svc = services[name]
            for dep, cond in svc.get("depends_on", {}).items():
                if cond.get("condition") == "service_healthy":
                    wait_healthy(dep, services[dep], config, procs)
            env = {**os.environ, **{k: str(v) for k, v in svc.get("environment", {}).items()}}
            logs[name] = (tmp_path / f"{name}.log").open("w")
            procs[name] = subprocess.Popen(local_argv(svc["entrypoint"] + svc["command"], config), cwd=ROOT, env=env,
                                           stdout=logs[name], stderr=subprocess.STDOUT, start_new_session=True)
        for name in services:
            wait_healthy(name, services[name], config, procs)
        client_addr = re.search(r'client = "([^"]+)"', config.read_text()).group(1)
        keys = client_keys(config_mod.load(config).security)
        assert keys is not None  # the compose stack binds beyond loopback: CURVE is on
        with Client(client_addr, timeout=120, keys=keys) as client:
            result = client.generate(prompt_ids=[5, 6, 7, 8], max_tokens=12, ignore_eos=True)
            assert result.completion_tokens == 12 and len(result.token_ids) == 12
        with Client(client_addr, timeout=1) as plain, pytest.raises(RequestTimeout):
            plain.stats()  # a client without the keys gets nothing
        plan = make_plan(workloads.synthetic(8, 20.0, 2.0, (1.1, 4, 64), (1.1, 1, 24), seed=1), seed=1)
        backend = functools.partial(zmq_backend, keys=keys)
        outcomes = asyncio.run(asyncio.wait_for(run_load(client_addr, plan, backend=backend), 120))
        assert [o.error for o in outcomes] == [""] * 8
        assert [o.tokens for o in outcomes] == [s.max_tokens for s in plan]
        assert all(o.scheduled_s <= o.first_token_s <= o.finish_s for o in outcomes)
        import httpx  # the http service answers the OpenAI API beside the ZeroMQ clients

        http = re.search(r'^http = "([^"]+)"', config.read_text(), flags=re.M).group(1)
        reply = httpx.post(f"http://{http}/v1/completions", timeout=60,
                           json={"model": "tiny", "prompt": "hi", "max_tokens": 3, "temperature": 0})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3, reply.text
    finally:
        for name, p in procs.items():
            if p.poll() is None:
                p.send_signal(getattr(signal, services[name].get("stop_signal", "SIGTERM")))  # as `docker stop` does
        for name, p in procs.items():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            logs[name].close()
        # In containers the pool goes with kvcache's IPC namespace at `docker-compose down`; here it is ours
        from common.hostpool import HostPool

        HostPool.remove(config_mod.load(config).endpoints.host_pool)
    codes = {n: p.returncode for n, p in procs.items()}
    assert set(codes.values()) == {0}, (codes, {n: (tmp_path / f"{n}.log").read_text()[-2000:] for n in procs})
