"""What every calibrate-and-decompose path shares: the ``Work`` of one compression, and the decomposition of one
input group as a plain function that Ray runs (numpy in, ``Factors`` out; no Ray import here)."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from nesta_ray.method.decompose import Factors, InputStats, Method, decompose_group
from nesta_ray.method.factorize import Solver
from nesta_ray.plan.linears import ModulePlan, Plan


@dataclass(frozen=True)
class Work:
    """One compression's work: the plan, the method, the calibration micro-batch size, mode (original | propagate)
    and precision (float32 | bfloat16: ``model.precision``), the torch threads each decomposition uses (fixed, so
    results are bit-identical whatever the number of workers), and the decomposition's factorisation (auto | svd |
    gram | gram+randomized) and precision (auto: the device's policy, ``pipeline.precision``; float64 | float32)."""

    plan: Plan
    method: Method
    micro_batch: int = 4
    mode: str = "original"
    threads: int = 1
    calibration_precision: str = "float32"
    factorization: str = "auto"
    decompose_precision: str = "auto"

    def subset(self, layers: list[int]) -> Work:
        """The same work restricted to ``layers`` (a layer shard's part)."""
        return dataclasses.replace(self, plan=self.plan.subset(layers))


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which honours taskset and cgroup cpusets on Linux;
    ``os.cpu_count()`` where the platform has no affinity call, as macOS)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@contextmanager
def fixed_threads(threads: int) -> Iterator[None]:
    """Run the body with ``threads`` torch threads (the decomposition's fixed count, so that factors computed in
    the driver equal those of a task or a shard bit for bit), then restore the caller's count."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def decompose_task(weights: dict[str, np.ndarray], plans: list[ModulePlan], method: Method,
                   stats: InputStats | None, threads: int, solver: Solver | None = None) -> dict[str, Factors]:
    """Decompose the linears of one input group: float32 weights (out, in) by name, their plans (ranks), the
    group's statistics, where and as ``solver`` says (default: the CPU in float64). Each result carries its share
    of the group's seconds. Raises as ``decompose``."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    factors = decompose_group({k: torch.tensor(v) for k, v in weights.items()}, {p.name: p.rank for p in plans},
                              method, stats, solver=solver)
    seconds = (time.perf_counter() - start) / max(len(factors), 1)
    return {name: dataclasses.replace(f, seconds=seconds) for name, f in factors.items()}
