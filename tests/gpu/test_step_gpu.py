"""On CUDA: a step's metadata is one pinned copy, the forward queues without waiting, sampling stays on the device."""

import pytest
import torch

from workers.model.batch import StepInput
from workers.model.device_sampling import sample_rows_on_device
from workers.model.runner import StageRunner
from workers.model.sampling import SamplingParams, sample_rows

pytestmark = pytest.mark.gpu


def test_the_forward_never_waits_for_the_gpu():
    runner = StageRunner.build("tiny", num_blocks=32, block_size=16, device="cuda", dtype="bfloat16",
                               attention="reference")
    step = StepInput([0, 1, 2], [1, 12, 1], [17, 0, 40], [[1, 2], [3], [4, 5, 6]], token_ids=torch.arange(14))
    runner.forward(step)  # warm-up: lazy initialisation may synchronize once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = runner.forward(step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == (3, runner.spec.vocab_size)


def test_device_sampling_is_taken_for_cuda_logits_and_keeps_seeds_batch_independent():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 50000, generator=g) * 3).cuda()
    p = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, seed=5)
    alone = [sample_rows(x[i:i + 1], [p], [3])[0][0] for i in range(6)]
    together, errors = sample_rows(x, [p] * 6, [3] * 6)
    assert not errors and alone == together
    assert together == sample_rows_on_device(x, [p] * 6, [3] * 6)[0]
    cpu = sample_rows_on_device(x.cpu(), [p] * 6, [3] * 6)[0]
    assert sum(a == b for a, b in zip(cpu, together)) >= 5  # same noise; float rounding may move a rare draw
