"""Sampling: greedy, seeds independent of the batch, top-k/top-p sets, stop rules, parameter checks."""

import pytest
import torch

from workers.model.sampling import SamplingParams, filtered_probs, finish_reason, sample


def logits(rows=4, vocab=50, seed=0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 2


def test_greedy_is_argmax():
    x = logits()
    assert sample(x, [SamplingParams()] * 4, [0, 1, 2, 3]) == x.argmax(-1).tolist()


def test_same_seed_same_tokens_whatever_the_batch():
    x = logits(rows=6)
    p = SamplingParams(temperature=1.0, seed=42)
    alone = [sample(x[i:i + 1], [p], [7])[0] for i in range(6)]
    together = sample(x, [p] * 6, [7] * 6)
    shuffled = sample(x.flip(0), [p] * 6, [7] * 6)[::-1]
    assert alone == together == shuffled
    # across steps the draws differ (not one fixed token per seed)
    many = [sample(x[:1], [p], [s])[0] for s in range(30)]
    assert len(set(many)) > 3
    assert many == [sample(x[:1], [p], [s])[0] for s in range(30)]


def test_top_k_never_leaves_its_set():
    x = logits(rows=1, vocab=100)
    allowed = set(x[0].topk(5).indices.tolist())
    drawn = {sample(x, [SamplingParams(temperature=2.0, top_k=5, seed=s)], [0])[0] for s in range(300)}
    assert drawn <= allowed and len(drawn) > 1


def test_top_p_never_leaves_its_nucleus():
    x = logits(rows=1, vocab=100, seed=1)
    probs = torch.softmax(x[0], -1)
    sorted_p, order = probs.sort(descending=True)
    n = int((sorted_p.cumsum(0) < 0.6).sum()) + 1  # smallest prefix reaching 0.6
    nucleus = set(order[:n].tolist())
    drawn = {sample(x, [SamplingParams(temperature=1.0, top_p=0.6, seed=s)], [0])[0] for s in range(300)}
    assert drawn <= nucleus and len(drawn) > 1
    kept = filtered_probs(x[0], SamplingParams(temperature=1.0, top_p=0.6))
    assert set(kept.nonzero().flatten().tolist()) == nucleus
    assert abs(float(kept.sum()) - 1.0) < 1e-5


def test_mixed_greedy_and_sampled_rows():
    x = logits(rows=3)
    ps = [SamplingParams(), SamplingParams(temperature=0.8, seed=1), SamplingParams()]
    out = sample(x, ps, [0, 0, 0])
    assert out[0] == int(x[0].argmax()) and out[2] == int(x[2].argmax())


def test_finish_reason():
    p = SamplingParams(max_tokens=3, stop_token_ids=(9,))
    assert finish_reason(p, 5, 1, (2,)) is None
    assert finish_reason(p, 9, 1, (2,)) == "stop"
    assert finish_reason(p, 2, 1, (2,)) == "stop"
    assert finish_reason(SamplingParams(max_tokens=3, ignore_eos=True), 2, 1, (2,)) is None
    assert finish_reason(p, 5, 3, (2,)) == "length"


@pytest.mark.parametrize("kwargs", [
    {"max_tokens": 0}, {"temperature": -0.1}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}, {"seed": 1.5},
])
def test_bad_params_are_rejected(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="logits"):
        sample(logits(rows=2), [SamplingParams()], [0])


def test_a_tiny_temperature_is_greedy_and_never_overflows():
    from workers.model.sampling import sample_rows

    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 30
    for t in (1e-45, 1e-30, 1e-6):
        tokens, errors = sample_rows(logits, [SamplingParams(temperature=t, seed=1)] * 3, [0, 0, 0])
        assert not errors and tokens == logits.argmax(dim=-1).tolist()
    # just above the greedy bound the logits are divided, relative to the largest: still the argmax
    tokens, errors = sample_rows(logits, [SamplingParams(temperature=2e-5, seed=1)] * 3, [0, 0, 0])
    assert not errors and tokens == logits.argmax(dim=-1).tolist()


def test_one_rows_failure_is_its_own():
    from workers.model.sampling import sample_rows

    logits = torch.randn(3, 20)
    logits[1] = float("nan")
    params = [SamplingParams(temperature=1.0, seed=7)] * 3
    tokens, errors = sample_rows(logits, params, [0, 0, 0])
    assert list(errors) == [1] and tokens[1] == -1
    assert tokens[0] == sample(logits[[0]], params[:1], [0])[0]
    assert tokens[2] == sample(logits[[2]], params[:1], [0])[0]
    with pytest.raises(ValueError, match="row 1"):
        sample(logits, params, [0, 0, 0])
