"""The stack's per-iteration cost in the profile: read, written, interpolated, and added by the simulator."""

from __future__ import annotations

import pytest

from bench.costmodel import ProfileCost
from bench.stack_cost import with_stack
from common.profile import Profile, ProfileError

BASE = {
    "version": 1, "model": "tiny",
    "prefill": {"input_len": [16, 256], "seconds": [0.01, 0.05]},
    "decode": {"batch_size": [1, 16], "context_len": [64, 1024], "seconds": [[0.004, 0.005], [0.008, 0.012]]},
}


def test_a_profile_without_a_stack_section_adds_nothing():
    cost = ProfileCost(Profile.from_dict(BASE), num_stages=2)
    assert cost.iteration_time([], [64]) == pytest.approx(0.004)
    assert cost.describe()["stack_overhead"] is None


def test_the_stack_section_round_trips_and_is_added_per_iteration_by_batch_size():
    data = {**BASE, "stack": {"num_stages": 2, "batch_size": [1, 8], "seconds": [0.002, 0.006]}}
    profile = Profile.from_dict(data)
    assert Profile.from_dict(profile.to_dict()) == profile
    assert profile.overhead_time(1, 2) == pytest.approx(0.002)
    assert profile.overhead_time(4, 2) == pytest.approx(0.002 + 3 / 7 * 0.004)
    assert profile.overhead_time(64, 2) == pytest.approx(0.006)  # held at the ends, not extrapolated
    assert profile.overhead_time(4, 1) == 0.0  # measured for another stage count
    cost = ProfileCost(profile, num_stages=2)
    assert cost.iteration_time([], [64]) == pytest.approx(0.004 + 0.002)
    assert cost.iteration_time([16], [64] * 7) == pytest.approx(profile.iteration_time([16], [64] * 7) + 0.006)
    assert cost.prefill_time(16) == pytest.approx(0.01)  # what skip-join ranks by stays the model's time


def test_a_malformed_stack_section_is_refused():
    with pytest.raises(ProfileError):
        Profile.from_dict({**BASE, "stack": {"num_stages": 2, "batch_size": [8, 1], "seconds": [0.1, 0.2]}})


def test_measurements_become_the_stack_section():
    rows = [{"jobs_per_iteration": 0.98, "added_ms": 2.5}, {"jobs_per_iteration": 8.2, "added_ms": 4.0},
            {"jobs_per_iteration": 16.0, "added_ms": -0.3}]
    profile = with_stack(Profile.from_dict(BASE), 2, rows)
    assert (profile.stack_stages, profile.stack_batch, profile.stack_s) == (2, (1, 8, 16), (0.0025, 0.004, 0.0))


def test_prefill_lengths_add_their_own_stack_cost_to_the_iterations_that_carry_them():
    stack = {"num_stages": 2, "batch_size": [1, 8], "seconds": [0.002, 0.006],
             "prefill_len": [64, 1024], "prefill_seconds": [0.001, 0.011]}
    profile = Profile.from_dict({**BASE, "stack": stack})
    assert Profile.from_dict(profile.to_dict()) == profile
    assert profile.prefill_overhead_time(544, 2) == pytest.approx(0.006)
    assert profile.prefill_overhead_time(16, 2) == pytest.approx(0.001)  # held below the shortest
    assert profile.prefill_overhead_time(2048, 2) == pytest.approx(0.011 + 1024 / 960 * 0.010)  # linear beyond
    assert profile.prefill_overhead_time(544, 1) == 0.0
    cost = ProfileCost(profile, num_stages=2)
    both = cost.iteration_time([544, 64], [64])
    assert both == pytest.approx(profile.iteration_time([544, 64], [64]) + profile.overhead_time(3, 2) + 0.006 + 0.001)
    assert cost.iteration_time([], [64]) == pytest.approx(0.004 + 0.002)  # decode-only iterations as before
    with pytest.raises(ProfileError):
        Profile.from_dict({**BASE, "stack": {**stack, "prefill_seconds": [0.001]}})


def test_prefill_measurements_join_the_stack_section():
    rows = [{"jobs_per_iteration": 1.0, "added_ms": 2.0}]
    prefills = [{"prompt_len": 1024, "added_ms": 9.0}, {"prompt_len": 64, "added_ms": -1.0}]
    profile = with_stack(Profile.from_dict(BASE), 2, rows, prefills)
    assert (profile.stack_prefill_len, profile.stack_prefill_s) == ((64, 1024), (0.0, 0.009))
