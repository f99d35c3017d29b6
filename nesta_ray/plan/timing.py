"""The time model of a job: throughputs (measured here or given), each shard's phase seconds, the whole job's.

No I/O; ``measure_rates`` times a few products in this process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nesta_ray.plan.sizing import ShardSize, svd_flops


@dataclass(frozen=True)
class Rates:
    """Throughputs for time estimates: fp32 matmul and fp64 SVD in GFLOP/s, storage reads/writes in GB/s."""

    matmul_gflops: float
    svd_gflops: float
    read_gbps: float = 1.0
    write_gbps: float = 0.5


@dataclass(frozen=True)
class ShardTime:
    """Seconds one shard spends calibrating (its forward, Gram products and weight reads) and decomposing (its
    SVDs and factor writes)."""

    calibration_s: float
    decomposition_s: float


def measure_rates(seconds: float = 0.5) -> Rates:
    """fp32 matmul and fp64 SVD throughput of this process (GFLOP/s), in about ``2·seconds``."""

    def rate(fn: Callable[[], object], flops: float) -> float:
        fn()
        start, runs = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            fn()
            runs += 1
        return flops * runs / (time.perf_counter() - start) / 1e9

    a = torch.randn(1024, 1024)
    m = torch.randn(384, 1024, dtype=torch.float64)
    return Rates(rate(lambda: a @ a, 2 * 1024**3),
                 rate(lambda: torch.linalg.svd(m, full_matrices=False), svd_flops(384, 1024)))


def shard_time(s: ShardSize, rates: Rates) -> ShardTime:
    """One shard's phase seconds at ``rates``."""
    return ShardTime(s.calibration_flops / (rates.matmul_gflops * 1e9) + s.weights_bytes / (rates.read_gbps * 1e9),
                     s.decomposition_flops / (rates.svd_gflops * 1e9) + s.write_bytes / (rates.write_gbps * 1e9))


def job_seconds(times: list[ShardTime], mode: str, batches: int) -> tuple[float, str]:
    """The job's calibration + decomposition seconds over its shards, and how they combine: in original mode
    micro-batches pipeline through the shards (the earlier ones fill the pipe) and each shard then decomposes its
    own layers; in propagate mode each shard calibrates and compresses before the next one starts."""
    if mode == "original":
        fill = sum(t.calibration_s for t in times[:-1]) / batches
        total = max(t.calibration_s for t in times) + fill + max(t.decomposition_s for t in times)
        return total, "micro-batches pipelined through the shards, then each decomposes its own layers"
    total = sum(t.calibration_s + t.decomposition_s for t in times)
    return total, "propagate: each shard calibrates and compresses its layers before the next one starts"
