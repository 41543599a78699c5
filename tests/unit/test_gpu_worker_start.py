"""A worker opens its copy executor at start, and a missing piece stops it there with one line."""

import sys
import uuid

import pytest
import torch

from common import config as config_mod
from common.hostpool import HostPool, HostPoolLayout
from workers import service
from workers.copy_executor import CpuCopyExecutor, startup
from workers.service import StageWorker


@pytest.fixture(autouse=True)
def process_settings():
    """from_config tunes the process (threads, GIL switch interval) for a worker; give the test process back."""
    threads, interval = torch.get_num_threads(), sys.getswitchinterval()
    yield
    torch.set_num_threads(threads)
    sys.setswitchinterval(interval)


@pytest.fixture
def make_config(tmp_path):
    def make(*overrides):
        ep = [f"endpoints.{k}=ipc://{tmp_path}/{k}" for k in ("client", "ingress", "scheduler", "kvcache")]
        base = ["model.path=tiny", "parallel.num_stages=1", "cache.num_gpu_blocks=16", "cache.headroom_blocks=2",
                "cache.num_host_blocks=8", f"endpoints.host_pool=fs_start_{uuid.uuid4().hex[:8]}", "endpoints.http=", "scheduler.profile="]
        return config_mod.load(None, [*ep, *base, *overrides])
    return make


def start_error(config) -> str:
    with pytest.raises(SystemExit) as e:
        StageWorker.from_config(config, 0)
    message = str(e.value.code)
    assert "\n" not in message and message.startswith("fastserve worker --stage 0: ")
    return message


def test_the_executor_is_open_and_mapped_before_any_swap(make_config):
    config = make_config()
    with HostPool.create(config.endpoints.host_pool, HostPoolLayout.from_config(config)):
        worker = StageWorker.from_config(config, 0)
        try:
            assert isinstance(worker.executor, CpuCopyExecutor)
            assert worker.executor.host_pool.shape[0] == 8
            assert worker.executor.device_pool is worker.runner.kv
        finally:
            worker.close()


def test_a_stack_that_never_swaps_opens_no_executor(make_config):
    worker = StageWorker.from_config(make_config("cache.num_host_blocks=0"), 0)
    try:
        assert worker.executor is None
    finally:
        worker.close()


def test_a_host_pool_that_never_appears_stops_the_worker_at_start(make_config, monkeypatch):
    monkeypatch.setattr(startup, "HOST_POOL_WAIT_S", 0.1)
    assert "did not appear" in start_error(make_config())


def test_a_pool_too_large_for_shared_memory_stops_the_worker_at_start(make_config, monkeypatch):
    config = make_config()
    monkeypatch.setattr(startup, "shm_room", lambda name, where=startup.SHM_DIR: (0, 4096))
    with HostPool.create(config.endpoints.host_pool, HostPoolLayout.from_config(config)):
        assert "lower cache.num_host_blocks" in start_error(config)


def test_a_missing_cupy_is_reported_at_start(make_config, monkeypatch):
    monkeypatch.setattr(service, "resolve_device", lambda device, stage, devices: torch.device("cuda", 0))
    monkeypatch.setattr(service.torch.cuda, "set_device", lambda device: None)
    monkeypatch.setitem(sys.modules, "cupy", None)
    message = start_error(make_config("model.device=cuda"))
    assert "CuPy" in message and "make gpu" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that cannot use CUDA")
def test_a_torch_without_cuda_is_reported_at_start(make_config):
    message = start_error(make_config("model.device=cuda"))
    assert "model.device is 'cuda'" in message and "make gpu" in message
