"""On CUDA: a worker sets its device once and opens its executor over a page-locked host pool at start."""

import uuid

import pytest
import torch

from common import config as config_mod
from common.hostpool import HostPool, HostPoolLayout
from workers.service import StageWorker

pytestmark = pytest.mark.gpu


def test_a_cuda_worker_pins_its_host_pool_at_start(tmp_path):
    pytest.importorskip("cupy")
    from workers.copy_executor.cuda import CudaCopyExecutor

    ep = [f"endpoints.{k}=ipc://{tmp_path}/{k}" for k in ("client", "ingress", "scheduler", "kvcache")]
    config = config_mod.load(None, [*ep, "model.path=tiny", "parallel.num_stages=2", "model.device=cuda",
                                    "cache.num_gpu_blocks=32", "cache.headroom_blocks=2", "cache.num_host_blocks=64", "endpoints.http=",
                                    f"endpoints.host_pool=fs_gpu_{uuid.uuid4().hex[:8]}", "scheduler.profile="])
    assert config.model.dtype == "bfloat16"
    with HostPool.create(config.endpoints.host_pool, HostPoolLayout.from_config(config)):
        worker = StageWorker.from_config(config, 1)  # with one visible GPU, stage 1 of 2 shares it
        try:
            assert isinstance(worker.executor, CudaCopyExecutor) and worker.executor._registered
            assert worker.runner.device.index == 1 % torch.cuda.device_count()
            assert torch.cuda.current_device() == worker.runner.device.index
        finally:
            worker.close()
