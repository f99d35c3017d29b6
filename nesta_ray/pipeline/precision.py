"""The decomposition's precision on a worker's device, decided by measurement, and the solver it gives.

float64 where the device runs it fast, float32 where it does not:

* a CPU: float64. scripts/benchmark_factorize.py --quick (results/factorize_cpu_quick.md) found float32 faster
  on most shapes but up to 6% worse in whitened loss on SmolLM2's first layer (o_proj; q_proj 2%), far outside
  the 0.1% the factorisations are held to: the saving is not worth the error.
* a GPU: measured when the worker starts: float64 when a float64 matrix product runs at least ``FP64_SHARE`` of
  the float32 rate (TF32 off). GPUs with float64 tensor cores (A100, H100, H200: 1:1 to 1:2) pass; consumer and
  inference GPUs (1:32 to 1:64) take float32, whose error bound is the benchmark's float32 rows.

``runtime.decompose_precision`` (float64 | float32) overrides the policy. The chosen precision and its reason go
into the shard's report; each linear's ``Factors.solver`` records device, precision and factorisation in
nesta.json.
"""

from __future__ import annotations

import time

import torch

from nesta_ray.method.factorize import Solver, solver_for
from nesta_ray.pipeline.tasks import Work

FP64_SHARE = 0.25


def fp64_share(device: torch.device, n: int = 2048, repeat: int = 3) -> float:
    """The float64 / float32 matrix-product rate on a CUDA ``device`` (TF32 off), best of ``repeat`` each."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        best = {}
        for dtype in (torch.float32, torch.float64):
            a = torch.randn(n, n, device=device, dtype=dtype)
            a @ a  # warm-up
            torch.cuda.synchronize(device)
            seconds = float("inf")
            for _ in range(repeat):
                start = time.perf_counter()
                a @ a
                torch.cuda.synchronize(device)
                seconds = min(seconds, time.perf_counter() - start)
            best[dtype] = seconds
        return best[torch.float32] / best[torch.float64]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def decompose_precision(device: torch.device, requested: str = "auto") -> tuple[str, str]:
    """(dtype, reason) of the decomposition on ``device``: ``requested`` unless "auto", else the policy above."""
    if requested != "auto":
        return requested, "runtime.decompose_precision"
    if device.type != "cuda":
        return "float64", f"{device.type}: float64 (the CPU policy, results/factorize_cpu_quick.md)"
    share = fp64_share(device)
    dtype = "float64" if share >= FP64_SHARE else "float32"
    return dtype, (f"{torch.cuda.get_device_name(device)}: float64 matmul at {share:.2f}x the float32 rate "
                   f"({'>=' if share >= FP64_SHARE else '<'} {FP64_SHARE}) -> {dtype}")


def device_solver(device: torch.device, work: Work) -> tuple[Solver, str]:
    """The solver of ``work`` on ``device`` (its factorisation, the precision policy's dtype) and the reason."""
    dtype, reason = decompose_precision(device, work.decompose_precision)
    return solver_for(work.factorization, str(device), dtype), reason
