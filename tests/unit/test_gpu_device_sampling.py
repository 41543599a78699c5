"""Batched device-side sampling (run here on CPU tensors): seeds independent of the batch, filters, distribution."""

import pytest
import torch

from workers.model.device_sampling import gumbel_noise, sample_rows_on_device
from workers.model.sampling import SamplingParams, filtered_probs


def logits(rows=4, vocab=50, seed=0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 2


def draw(x, params, steps):
    tokens, errors = sample_rows_on_device(x, params, steps)
    assert not errors
    return tokens


def test_same_seed_same_token_whatever_the_batch():
    x = logits(rows=6)
    p = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=42)
    alone = [draw(x[i:i + 1], [p], [7])[0] for i in range(6)]
    together = draw(x, [p] * 6, [7] * 6)
    mixed = draw(torch.cat([x, logits(rows=3, seed=5)]), [p] * 6 + [SamplingParams(temperature=0.5, seed=1)] * 3,
                 [7] * 9)[:6]
    assert alone == together == mixed
    many = [draw(x[:1], [p], [s])[0] for s in range(30)]
    assert len(set(many)) > 3 and many == [draw(x[:1], [p], [s])[0] for s in range(30)]


def test_greedy_rows_are_argmax_and_sampled_rows_stay_in_their_sets():
    x = logits(rows=1, vocab=100, seed=1)
    top5 = set(x[0].topk(5).indices.tolist())
    nucleus = set(filtered_probs(x[0], SamplingParams(temperature=1.0, top_p=0.6)).nonzero().flatten().tolist())
    rows = x.expand(300, -1)
    k = draw(rows, [SamplingParams(temperature=2.0, top_k=5, seed=s) for s in range(300)], [0] * 300)
    p = draw(rows, [SamplingParams(temperature=1.0, top_p=0.6, seed=s) for s in range(300)], [0] * 300)
    assert set(k) <= top5 and len(set(k)) > 1
    assert set(p) <= nucleus and len(set(p)) > 1
    g = draw(rows[:3], [SamplingParams(), SamplingParams(temperature=1e-7, seed=3), SamplingParams()], [0, 0, 0])
    assert g == [int(x[0].argmax())] * 3


def test_draws_follow_the_filtered_distribution():
    row = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -9.0]])
    params = SamplingParams(temperature=0.8, top_k=4)
    expected = filtered_probs(row[0], params)
    n = 20000
    tokens = draw(row.expand(n, -1), [SamplingParams(temperature=0.8, top_k=4, seed=s) for s in range(n)], [3] * n)
    freq = torch.bincount(torch.tensor(tokens), minlength=6).double() / n
    assert freq[4:].sum() == 0
    assert torch.allclose(freq, expected.double(), atol=0.015), (freq, expected)


def test_gumbel_noise_is_a_function_of_the_key_alone():
    keys = torch.tensor([[1, 2], [3, 4], [1, 2]])
    g = gumbel_noise(keys, 1000)
    assert torch.equal(g[0], g[2]) and not torch.equal(g[0], g[1])
    assert torch.isfinite(g).all() and abs(float(g.mean()) - 0.5772) < 0.1  # the Gumbel mean is Euler's gamma


def test_one_rows_failure_is_its_own():
    x = logits(rows=3)
    x[1] = float("nan")
    p = SamplingParams(temperature=1.0, seed=9)
    tokens, errors = sample_rows_on_device(x, [p] * 3, [0] * 3)
    assert tokens[1] == -1 and list(errors) == [1] and "not finite" in errors[1]
    assert tokens[0] == draw(x[:1], [p], [0])[0] and tokens[2] == draw(x[2:], [p], [0])[0]


@pytest.mark.parametrize("temperature", [1e-4, 0.01])
def test_small_temperatures_never_overflow(temperature):
    x = logits(rows=2) * 100
    tokens = draw(x, [SamplingParams(temperature=temperature, seed=1)] * 2, [0, 0])
    assert tokens == x.argmax(-1).tolist()
