"""`fastserve up` as a supervisor: its run directory, the host pool name it is given, and its death."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from stack import Stack


def children(pid: int) -> dict[int, str]:
    """The launcher's children: pid -> command line."""
    out = subprocess.run(["pgrep", "-a", "-P", str(pid)], capture_output=True, text=True).stdout
    return {int(line.split()[0]): line for line in out.splitlines()}


def config_path(cmdline: str) -> Path:
    words = cmdline.split()
    return Path(words[words.index("--config") + 1])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()[:1] != "Z"


def test_a_chosen_host_pool_name_is_kept_and_the_run_directory_goes_with_the_stack():
    pool = f"fastserve_test_{uuid.uuid4().hex[:8]}"
    stack = Stack(["scheduler.policy=fcfs", f"endpoints.host_pool={pool}"], num_stages=1)
    try:
        kids = children(stack.proc.pid)
        assert len(kids) == 5  # ingress, scheduler, kvcache, one worker, the HTTP front door
        run_dir = config_path(next(iter(kids.values()))).parent
        assert run_dir.is_dir()
        assert f'host_pool = "{pool}"' in (run_dir / "config.toml").read_text()
        assert Path(f"/dev/shm/{pool}").exists()  # the KV manager created the pool under that name
        # `fastserve up` serves the OpenAI-compatible API too, on endpoints.http
        import httpx

        assert httpx.get(f"{stack.http}/health", timeout=30).status_code == 200
        reply = httpx.post(f"{stack.http}/v1/completions", timeout=60,
                           json={"model": "tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 4
    finally:
        assert stack.stop() == 0
    assert not run_dir.exists()


def test_children_do_not_outlive_a_killed_launcher():
    stack = Stack(["scheduler.policy=fcfs"], num_stages=1)
    found = children(stack.proc.pid)
    kids = list(found)
    assert len(kids) == 5
    run_dir = config_path(next(iter(found.values()))).parent  # a killed launcher cannot remove it itself
    stack.proc.send_signal(signal.SIGKILL)
    stack.proc.wait(10)
    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in kids) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in kids if alive(pid)]
    for pid in left:  # do not leak them into the rest of the suite, whatever the outcome
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(run_dir, ignore_errors=True)
    assert not left, f"children still running after the launcher died: {left}"


def test_a_model_that_cannot_be_profiled_ends_fastserve_up_with_one_line_and_no_traceback(tmp_path):
    import sys

    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host runs CUDA: the profile would succeed")
    env = {**os.environ, "FASTSERVE_CACHE": str(tmp_path)}  # no cached profile: it must be measured
    proc = subprocess.run([sys.executable, "-m", "services.cli", "up", "--model", "tiny", "--set", "model.device=cuda",
                           "--set", "endpoints.http="], capture_output=True, text=True, timeout=120, env=env,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "fastserve up: profiling the model for skip-join failed" in proc.stderr
    assert "CPU-only build" in proc.stderr  # the profile's own one-line cause comes first
    assert not list(tmp_path.glob("profile-*"))  # no half-written profile is left to be reused


async def test_a_curve_stack_serves_clients_with_its_keys_and_heartbeats_through_curve(tmp_path):
    from common.client import AsyncClient, RequestTimeout
    from common.curve import ClientKeys, make_keys

    keys = tmp_path / "keys"
    make_keys(keys)
    stack = Stack(["scheduler.policy=fcfs", "security.curve=true", f"security.keys_dir={keys}",
                   "liveness.heartbeat_s=0.2", "liveness.timeout_s=1"], num_stages=2)
    try:
        async with AsyncClient(stack.endpoint, timeout=60, keys=ClientKeys.load(keys)) as client:
            await client.wait_ready(timeout=60)
            result = await client.generate(prompt_ids=[1, 2, 3], max_tokens=5)
            assert len(result.token_ids) == 5
            await asyncio.sleep(2.5)  # longer than the liveness timeout: heartbeats pass the CURVE inboxes
            assert (await client.stats())["stack_up"] == 1
        async with AsyncClient(stack.endpoint, timeout=2) as plain:
            with pytest.raises(RequestTimeout):
                await plain.generate(prompt_ids=[1], max_tokens=1)
    finally:
        assert stack.stop() == 0
