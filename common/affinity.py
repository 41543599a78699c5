"""CPU cores per process (`parallel.control_cpus`): stage workers on cores of their own, the rest together.

On a CPU stack every process competes for the same cores, and a worker's model step is the one thing
that must not wait: when the scheduler, the KV manager or ingress wakes up on the core a worker computes
on, that step stalls for as long as they run. With `control_cpus = n > 0`, each process pins itself at
start: ingress, the scheduler, the KV manager and the HTTP front door to the first n cores this process
may use, and the workers to equal shares of the rest (workers share cores only when there are fewer
cores left than stages). A worker then runs one torch thread per core of its share unless
`parallel.cpu_threads` says otherwise. The launcher stays unpinned: its children start from its mask.
`fastserve profile` times the model step on stage 0's share. 0 (the default) pins nothing.
"""

from __future__ import annotations

import os

from common.config import ConfigError, ParallelConfig


def available() -> list[int]:
    """The cores this process may run on (its affinity mask: cgroups and taskset narrow it)."""
    return sorted(os.sched_getaffinity(0))


def cores_for(parallel: ParallelConfig, role: str, stage: int, cores: list[int]) -> list[int] | None:
    """The cores one process of the stack runs on; None when nothing is pinned."""
    n = parallel.control_cpus
    if n <= 0:
        return None
    if n >= len(cores):
        raise ConfigError(f"parallel.control_cpus is {n} but this machine gives the stack {len(cores)} core(s); "
                          "leave at least one core for the workers, or set it to 0")
    control, rest = cores[:n], cores[n:]
    if role != "worker":
        return control
    stages = parallel.num_stages
    if len(rest) < stages:
        return [rest[stage % len(rest)]]
    share = len(rest) // stages
    return rest[stage * share : (stage + 1) * share]


def pin(parallel: ParallelConfig, role: str, stage: int = -1) -> list[int] | None:
    """Pin this process (every thread it starts later too) by `parallel.control_cpus`; the cores, or None."""
    cores = cores_for(parallel, role, stage, available())
    if cores is not None:
        # every thread already running too (a math library's pool started at import); later ones inherit
        for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]:
            try:
                os.sched_setaffinity(int(tid), cores)
            except OSError:  # the thread ended meanwhile
                pass
    return cores
