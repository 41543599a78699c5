"""Which cores each process of a pinned CPU stack runs on (parallel.control_cpus)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from common.affinity import cores_for
from common.config import ConfigError, ParallelConfig, worker_threads


def test_the_control_plane_gets_the_first_cores_and_each_worker_an_equal_share_of_the_rest():
    p = ParallelConfig(num_stages=2, control_cpus=2)
    cores = [0, 1, 2, 3, 4, 5, 6, 7]
    assert cores_for(p, "scheduler", -1, cores) == cores_for(p, "ingress", -1, cores) == [0, 1]
    assert cores_for(p, "worker", 0, cores) == [2, 3, 4] and cores_for(p, "worker", 1, cores) == [5, 6, 7]
    assert cores_for(ParallelConfig(num_stages=3, control_cpus=1), "worker", 2, [4, 5, 6]) == [5]  # fewer cores than stages
    assert cores_for(ParallelConfig(num_stages=1), "worker", 0, cores) is None  # 0: nothing is pinned
    with pytest.raises(ConfigError, match="at least one core"):
        cores_for(ParallelConfig(control_cpus=2), "kvcache", -1, [0, 1])


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to pin apart")
def test_a_worker_started_from_the_command_line_pins_itself_and_runs_one_thread_per_core_of_its_share():
    code = ("import os, sys; from common.process import parse; from common.config import worker_threads;"
            "args, c = parse('fastserve worker', '', sys.argv[1:], stage=True);"
            "print(sorted(os.sched_getaffinity(0)), worker_threads(c.parallel))")
    cores = sorted(os.sched_getaffinity(0))
    out = subprocess.run([sys.executable, "-c", code, "--stage", "0", "--set", "parallel.num_stages=1",
                          "--set", "parallel.control_cpus=1"], capture_output=True, text=True, check=True)
    assert out.stdout.split("] ") == [str(cores[1:])[:-1], f"{len(cores) - 1}\n"]
    assert worker_threads(ParallelConfig(num_stages=2, cpu_threads=3, control_cpus=1)) == 3  # explicit wins
