"""The time model of a job and a night: throughputs (measured here or given: ``plan.rates``), each shard's phase
seconds, every phase of the lifecycle, and the job's physical floor (its bytes at the stated bandwidths, its FLOPs
at the stated peaks).

No I/O; ``measure_rates`` times a few products in this process.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nesta_ray.config.schema import JobConfig
from nesta_ray.plan.rates import Rates
from nesta_ray.plan.sizing import ShardSize, svd_flops


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
    load = os.getloadavg()[0]
    return Rates(rate(lambda: a @ a, 2 * 1024**3),
                 rate(lambda: torch.linalg.svd(m, full_matrices=False), svd_flops(384, 1024)),
                 label=f"measured on this machine (1 process, {2 * seconds:.0f} s, 1-minute load average "
                       f"{load:.1f}; a rates file is steadier: scripts/cpu_rates.py)")


def shard_time(s: ShardSize, rates: Rates) -> ShardTime:
    """One shard's phase seconds at ``rates``: its forward, Gram products and weight reads; its factorisations by
    kind, the Grams' and factors' copies between host and device, and the staged factors' writes."""
    forward = (s.calibration_flops - s.gram_flops) / (rates.rate("matmul_gflops") * 1e9)
    grams = s.gram_flops / (rates.rate("gram_gflops") * 1e9)
    return ShardTime(forward + grams + s.weights_bytes / (rates.read_gbps * 1e9),
                     rates.flops_seconds(s.decomposition_work) + s.copy_bytes / (rates.rate("copy_gbps") * 1e9)
                     + s.write_bytes / (rates.write_gbps * 1e9))


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


@dataclass(frozen=True)
class Phase:
    """One phase of a job or a night: its estimated seconds, the bytes it reads and writes, and how it runs."""

    name: str
    seconds: float
    read_bytes: int = 0
    written_bytes: int = 0
    how: str = ""


def forward_seconds(shards: list[ShardSize], vocab_hidden: int, tokens: int, batches: int, rates: Rates, *,
                    compressed: bool) -> float:
    """A forward of ``tokens`` tokens in ``batches`` micro-batches pipelined through the shards: each shard's
    layers (2 FLOPs per parameter and token) and the last one's head; the earlier shards fill the pipe."""
    times = [2.0 * (s.params_after if compressed else s.params) * tokens / (rates.matmul_gflops * 1e9)
             + (2.0 * vocab_hidden * tokens / (rates.matmul_gflops * 1e9) if s.last else 0.0) for s in shards]
    return max(times) + sum(times[:-1]) / max(batches, 1)


def _eval(cfg: JobConfig, shards: list[ShardSize], vocab_hidden: int, rates: Rates, compressed: bool) -> float:
    ev = cfg.evaluation
    windows = sum(s.num_windows for s in ev.sets)
    return forward_seconds(shards, vocab_hidden, windows * ev.seq_len, -(-windows // ev.batch_size), rates,
                           compressed=compressed)


def _generation(cfg: JobConfig, shards: list[ShardSize], vocab_hidden: int, rates: Rates, cases: int) -> float:
    """Greedy decoding recomputes the whole sequence per new token, one sequence at a time (no pipelining):
    a 32-token prompt is assumed."""
    steps = cfg.gate.max_new_tokens if cfg.gate else cfg.evaluation.max_new_tokens
    tokens = sum(32 + t for t in range(steps))
    per_token = sum(2.0 * s.params_after for s in shards) + 2.0 * vocab_hidden
    return cases * tokens * per_token / (rates.matmul_gflops * 1e9)


def job_phases(cfg: JobConfig, shards: list[ShardSize], vocab_hidden: int, rates: Rates,
               cases: int = 0) -> list[Phase]:
    """Every phase of a sharded job at ``rates``: loading, dense evaluation, the automatic ratio's preparation
    and points, calibration + decomposition, compressed evaluation, generation and the gate's ``cases``, and
    writing. Loading and writing move the bytes; the shards work in parallel, so a phase takes its slowest
    shard (the pipeline's fill added)."""
    cal = cfg.calibration
    times = [shard_time(s, rates) for s in shards]
    compress, how = job_seconds(times, cal.mode, -(-cal.num_sequences // cal.micro_batch))
    weights = sum(s.weights_bytes for s in shards)
    written = sum(s.write_bytes for s in shards)
    phases = [Phase("load weights", max(s.weights_bytes for s in shards) / (rates.read_gbps * 1e9), weights, 0,
                    "each shard reads its own tensors (ranged reads)")]
    if cfg.evaluation.dense and cfg.evaluation.sets:
        phases.append(Phase("evaluate dense", _eval(cfg, shards, vocab_hidden, rates, False), how="pipelined"))
    if cfg.method.auto:
        points = max(1, math.ceil(math.log2(len(cfg.method.auto.grid()) + 1)))
        prepare = max(t.calibration_s for t in times) + max(t.decomposition_s for t in times) / 2
        auto_set = next(s for s in cfg.evaluation.sets if s.name == cfg.method.auto.set)
        point = forward_seconds(shards, vocab_hidden, auto_set.num_windows * cfg.evaluation.seq_len,
                                auto_set.num_windows, rates, compressed=True)
        point += max(t.decomposition_s for t in times) / 2  # truncations and residual factorisations
        phases += [Phase("auto ratio: prepare", prepare, how="calibration + one scaled SVD per linear"),
                   Phase(f"auto ratio: {points} points", points * point, how="truncate, residual SVDs, evaluate")]
    phases.append(Phase("calibrate + decompose", compress, 0, written, how))
    if cfg.evaluation.sets:
        phases.append(Phase("evaluate compressed", _eval(cfg, shards, vocab_hidden, rates, True), how="pipelined"))
    if cases or cfg.evaluation.prompt:
        phases.append(Phase("generation + gate cases", _generation(cfg, shards, vocab_hidden, rates,
                                                                   cases + bool(cfg.evaluation.prompt)),
                            how="greedy, recomputed per token"))
    kept = sum(s.checkpoint_bytes - s.factor_bytes for s in shards)  # tensors copied from the source
    checkpoint = sum(s.checkpoint_bytes for s in shards)
    phases.append(Phase("write checkpoint", (written + kept) / (rates.read_gbps * 1e9) + checkpoint / (
        rates.write_gbps * 1e9), written + kept, checkpoint, "the reducer reads the stage and the kept tensors, "
                        "writes the shards in the source dtype"))
    return phases


def drift_phase(cfg: JobConfig, shards: list[ShardSize], plan_flops: float, rates: Rates) -> Phase:
    """Scoring drift on ``nightly.sample_sequences`` windows: the shards (new ones) read their dense tensors and
    the published factors, run a dense calibration forward, and score each linear's relative error under its Gram
    (``plan_flops`` for all of them: W·G and the factors' products)."""
    tokens = cfg.nightly.sample_sequences * cfg.calibration.seq_len
    scale = tokens / (cfg.calibration.num_sequences * cfg.calibration.seq_len)
    forward = max(s.calibration_flops * scale for s in shards) / (rates.matmul_gflops * 1e9)
    read = max(s.weights_bytes + s.factor_bytes for s in shards) / (rates.read_gbps * 1e9)
    seconds = read + forward + plan_flops / len(shards) / (rates.matmul_gflops * 1e9)
    return Phase("score drift", seconds, sum(s.weights_bytes + s.factor_bytes for s in shards), 0,
                 "shards read their tensors and the published factors, dense Grams of the sample, errors")


def job_floor(cfg: JobConfig, shards: list[ShardSize], vocab_hidden: int, rates: Rates) -> list[Phase]:
    """The job's physical floor at the stated peaks, its work spread evenly over the shards: one read of the
    weights, the calibration forward (2 FLOPs per parameter and token) and the Gram products, the factorisations
    (their work model), the evaluation forwards (dense and compressed, with the head) and one write of the
    checkpoint. Generation, pipeline fill, the stage and every overhead are left out."""
    k = len(shards)
    windows = sum(s.num_windows for s in cfg.evaluation.sets) * cfg.evaluation.seq_len
    work: dict[str, float] = {}
    for s in shards:
        for kind, f in s.decomposition_work.items():
            work[kind] = work.get(kind, 0.0) + f
    evaluate = (2.0 * sum(s.params + s.params_after for s in shards) * windows
                + 2 * (2.0 * vocab_hidden * windows)) if cfg.evaluation.sets else 0.0
    gram = sum(s.gram_flops for s in shards)
    forward = sum(s.calibration_flops for s in shards) - gram
    peak = lambda name: rates.peak(name) * 1e9  # noqa: E731
    return [Phase("read the weights once", sum(s.weights_bytes for s in shards) / peak("read_gbps") / k,
                  sum(s.weights_bytes for s in shards)),
            Phase("calibration forward", forward / peak("matmul_gflops") / k),
            Phase("Gram products", gram / peak("gram_gflops") / k),
            Phase("factorisations", rates.flops_seconds(work, at_peak=True) / k),
            Phase("evaluation forwards", evaluate / peak("matmul_gflops") / k),
            Phase("write the checkpoint", sum(s.checkpoint_bytes for s in shards) / peak("write_gbps") / k, 0,
                  sum(s.checkpoint_bytes for s in shards))]
