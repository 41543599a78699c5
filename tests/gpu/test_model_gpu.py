"""On CUDA: the model in float16/bfloat16 follows transformers and the CPU float32 reference."""

import pytest
import torch

from kernels.block_copy import copy_blocks
from workers.model.batch import StepInput
from workers.model.runner import StageRunner

pytestmark = pytest.mark.gpu


def _decode(runner: StageRunner, prompt: list[int], steps: int, table: list[int]) -> list[torch.Tensor]:
    ids, ctx, logits = prompt, 0, []
    for _ in range(steps):
        out = runner.forward(StepInput([0], [len(ids)], [ctx], [table], token_ids=torch.tensor(ids)))
        ctx += len(ids)
        logits.append(out[0].float().cpu())
        ids = [int(out[0].argmax())]
    return logits


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_half_logits_follow_cpu_float32(dtype):
    prompt = list(range(40, 72))
    cpu = StageRunner.build("tiny", num_blocks=16, block_size=16)
    gpu = StageRunner.build("tiny", num_blocks=16, block_size=16, device="cuda", dtype=dtype)
    ref = _decode(cpu, prompt, 1, [3, 1, 7])[0]
    got = _decode(gpu, prompt, 1, [3, 1, 7])[0]
    tol = 0.05 if dtype == "float16" else 0.2
    assert (got - ref).abs().max() / ref.abs().max() < tol
    assert int(got.argmax()) == int(ref.argmax())


def test_cuda_float32_matches_cpu_over_decode_steps():
    prompt = [5, 17, 3, 44, 9, 23]
    cpu = _decode(StageRunner.build("tiny", num_blocks=8, block_size=8), prompt, 32, [5, 0, 2, 6, 1])
    gpu = _decode(StageRunner.build("tiny", num_blocks=8, block_size=8, device="cuda"), prompt, 32, [5, 0, 2, 6, 1])
    assert [int(x.argmax()) for x in cpu] == [int(x.argmax()) for x in gpu]
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_block_copy_device_to_host_and_back():
    gpu = torch.randn(8, 2, 2, 4, 16, 8, device="cuda")
    host = torch.zeros(8, 2, 2, 4, 16, 8).pin_memory()
    copy_blocks(gpu, host, [1, 2, 5], [0, 1, 2])
    back = torch.zeros_like(gpu)
    copy_blocks(host, back, [0, 1, 2], [7, 3, 4])
    torch.cuda.synchronize()
    assert torch.equal(back[[7, 3, 4]], gpu[[1, 2, 5]])
