"""Logprobs of sampled tokens: the pure last-stage function, and how they ride BatchSampling, BatchResult and JobEvent."""

from __future__ import annotations

import math

import pytest
import torch

from common import codec
from common.config import SchedulerConfig
from common.messages import BatchResult, BatchSampling, JobEvent, SubmitJob, TokenLogprobs
from services.scheduler.core import SchedulerCore
from services.scheduler.policies import make_policy
from services.scheduler.service import from_wire
from workers.model.logprobs import FLOOR, token_logprobs


def test_the_token_and_its_top_k_are_the_rows_log_softmax():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 1.0]])
    out = token_logprobs(logits, [0, 3], [2, 0])
    z0 = math.log(sum(math.exp(x) for x in (1.0, 3.0, 2.0, 0.0)))
    assert out[0].logprob == pytest.approx(1.0 - z0)
    assert out[0].top_ids == [1, 2]
    assert out[0].top_logprobs == pytest.approx([3.0 - z0, 2.0 - z0])
    z1 = math.log(3 + math.exp(5.0) + math.exp(1.0) - 1)
    assert out[1].logprob == pytest.approx(1.0 - z1) and out[1].top_ids == [] and out[1].top_logprobs == []


def test_rows_that_do_not_ask_or_failed_get_none_and_no_asks_give_an_empty_list():
    logits = torch.zeros(3, 8)
    out = token_logprobs(logits, [1, -1, 2], [None, 3, 5])
    assert out[0] is None and out[1] is None
    assert out[2].logprob == pytest.approx(-math.log(8)) and len(out[2].top_ids) == 5
    assert token_logprobs(logits, [1, 2, 3], [None, None, None]) == []


def test_a_zero_probability_is_the_floor_not_minus_infinity():
    logits = torch.tensor([[0.0, float("-inf"), 1.0]])
    (entry,) = token_logprobs(logits, [1], [3])
    assert entry.logprob == FLOOR and entry.top_ids == [2, 0, 1] and entry.top_logprobs[-1] == FLOOR


def test_mismatched_columns_are_refused():
    with pytest.raises(ValueError):
        token_logprobs(torch.zeros(2, 4), [1], [None, None])


def test_old_senders_decode_with_no_logprobs_asked():
    sampling = BatchSampling([0.0, 1.0], [0, 0], [1.0, 1.0], [None, 3], [0, 4])
    assert sampling.logprobs == [None, None] and sampling.select([1]).logprobs == [None]
    event = JobEvent(1, [5], "", "", "")
    assert codec.decode(codec.encode(event)).logprobs == []
    result = BatchResult(0, [1], [5], 0.0, "")
    assert result.logprobs_of(0) is None


def test_the_scheduler_asks_per_job_and_forwards_each_tokens_logprobs():
    core = SchedulerCore(make_policy(SchedulerConfig(policy="fcfs")), 1, ())
    core.submit(SubmitJob(1, [7, 8], 4, 0.0, 0, 1.0, None, [], False, logprobs=2), 0.0)
    core.submit(SubmitJob(2, [9], 4, 0.0, 0, 1.0, None, [], False), 0.0)
    batch = core.schedule(0.0)
    assert batch.sampling.logprobs == [2, None]
    entry = TokenLogprobs(-0.5, [11, 12], [-0.5, -1.5])
    result = BatchResult(batch.batch_id, [1, 2], [11, 3], 0.01, "", logprobs=[entry, None])
    assert codec.decode(codec.encode(result)) == result
    first, second = core.update(from_wire(result), 0.1)
    assert (first.job_id, first.token_ids, first.logprobs) == (1, [11], [entry])
    assert (second.job_id, second.logprobs) == (2, [])
