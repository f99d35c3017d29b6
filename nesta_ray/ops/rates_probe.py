"""Measures, on one device, every rate a rates file states (``plan.rates.FIELDS``), for ``scripts/cpu_rates.py``
and ``scripts/gpu_check.py``.

Each rate is the best of a few timed calls inside a time budget: the forward's and the Gram products at the
calibration precision, the decomposition's products, Cholesky, eigh, SVD and QR at its precision (the work models of
``method.factorize``), host <-> device copies (CUDA only) and storage reads and writes of one object under a URI
(local or remote through ``io.storage``; a local read right after the write may come from the page cache, which is
said in the result).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nesta_ray.io.storage import join, put_object, read_bytes, remove_tree
from nesta_ray.model.precision import gram_product


def cpu_name() -> str:
    """The host CPU as /proc/cpuinfo names it, with the bfloat16 matrix extensions it has (AMX, AVX-512 BF16):
    they decide how fast the bfloat16 calibration path is, and the machines results are measured on differ.
    ``platform.processor()`` (for example ``x86_64``) where /proc/cpuinfo is unreadable."""
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    bf16 = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return f"{model} ({', '.join(bf16) or 'no bf16 matrix extensions'})"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn: Callable[[], object], device: torch.device, budget: float, most: int = 5) -> float:
    """The best time of ``fn`` after one warm-up call, over at most ``most`` calls within ``budget`` seconds."""
    fn()
    _sync(device)
    best, spent, calls = float("inf"), 0.0, 0
    while calls < most and (calls == 0 or spent < budget):
        start = time.perf_counter()
        fn()
        _sync(device)
        took = time.perf_counter() - start
        best, spent, calls = min(best, took), spent + took, calls + 1
    return best


def _spd(n: int, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, n, generator=gen, dtype=dtype).to(device)
    return x @ x.T / n + torch.eye(n, device=device, dtype=dtype)


def compute_rates(device: torch.device, precision: str, dtype: torch.dtype, n: int,
                  budget: float) -> tuple[dict[str, float], dict[str, str]]:
    """GFLOP/s of the forward's and the Gram products at calibration ``precision`` (float32 | bfloat16) and of the
    decomposition's products and factorisations in ``dtype`` at size ``n``, and how each was measured."""
    gen = torch.Generator().manual_seed(0)
    fwd_dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    x = torch.randn(4 * n, n, generator=gen).to(device)  # (T, n) activations
    w = torch.randn(n, n, generator=gen).to(device, fwd_dtype)
    a = torch.randn(n, n, generator=gen, dtype=dtype).to(device)
    spd = _spd(n, device, dtype, gen)
    tall = torch.randn(4 * n, 64, generator=gen, dtype=dtype).to(device)
    half = torch.randn(n // 2, n, generator=gen, dtype=dtype).to(device)
    work = {
        "matmul_gflops": (lambda: x.to(fwd_dtype) @ w, 2.0 * 4 * n * n * n, f"(4n, n) @ (n, n) in {fwd_dtype}"),
        "gram_gflops": (lambda: gram_product(x, precision), 2.0 * 4 * n * n * n, f"xᵀx of (4n, n) at {precision}"),
        "gemm_gflops": (lambda: a @ a, 2.0 * n**3, f"(n, n) @ (n, n) in {dtype}"),
        "cholesky_gflops": (lambda: torch.linalg.cholesky(spd), n**3 / 3.0, f"cholesky (n, n) in {dtype}"),
        "eigh_gflops": (lambda: torch.linalg.eigh(spd), 9.0 * n**3, f"eigh (n, n) in {dtype}, 9n³ FLOPs"),
        "svd_gflops": (lambda: torch.linalg.svd(half, full_matrices=False), 4.0 * n * (n / 2) ** 2 + 22.0 * (n / 2)
                       ** 3, f"thin svd (n/2, n) in {dtype}"),
        "qr_gflops": (lambda: torch.linalg.qr(tall), 4.0 * 4 * n * 64 * 64, f"qr (4n, 64) in {dtype}"),
    }
    rates, how = {}, {}
    for name, (fn, flops, text) in work.items():
        rates[name] = flops / best_seconds(fn, device, budget) / 1e9
        how[name] = f"{text}, n = {n}, best of <= 5 calls"
    return rates, how


def copy_rate(device: torch.device, mib: int, budget: float) -> float:
    """GB/s of copying ``mib`` MiB host -> device and back (pageable host memory), the slower direction."""
    host = torch.empty(mib * 2**18, dtype=torch.float32)
    dev = host.to(device)
    up = best_seconds(lambda: host.to(device), device, budget)
    down = best_seconds(lambda: dev.to("cpu"), device, budget)
    return host.numel() * 4 / max(up, down) / 1e9


def storage_rates(uri: str, mib: int, storage_options: dict | None = None) -> dict[str, float]:
    """GB/s of writing and then reading one ``mib`` MiB object under ``uri`` (removed after)."""
    data = os.urandom(mib * 2**20)
    where = join(uri, f"nesta-rates-probe-{os.getpid()}")
    start = time.perf_counter()
    put_object(join(where, "blob"), data, storage_options)
    write = len(data) / (time.perf_counter() - start) / 1e9
    start = time.perf_counter()
    got = read_bytes(join(where, "blob"), storage_options)
    read = len(got) / (time.perf_counter() - start) / 1e9
    remove_tree(where, storage_options)
    return {"read_gbps": read, "write_gbps": write}


def measure(device: torch.device, precision: str, dtype: torch.dtype, n: int, budget: float,
            storage_uri: str | None) -> tuple[dict[str, float], dict[str, Any]]:
    """Every rate of ``plan.rates.FIELDS`` on ``device`` (copy on CUDA only, storage where ``storage_uri`` is given)
    and a record of how each was measured."""
    rates, how = compute_rates(device, precision, dtype, n, budget)
    if device.type == "cuda":
        rates["copy_gbps"] = copy_rate(device, 256, budget)
        how["copy_gbps"] = "256 MiB pageable host <-> device, the slower direction"
    if storage_uri is not None:
        rates.update(storage_rates(storage_uri, 256))
        how["read_gbps"] = how["write_gbps"] = f"one 256 MiB object under {storage_uri} (a local read may be cached)"
    return rates, {"how": how, "precision": precision, "dtype": str(dtype), "n": n,
                   "loadavg_1min": os.getloadavg()[0], "torch": torch.__version__,
                   "threads": torch.get_num_threads()}
