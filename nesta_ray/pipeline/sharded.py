"""Layer-sharded calibration and decomposition: N Ray actors, each owning a contiguous range of decoder layers.

Hidden states flow from shard to shard through Ray's object store; shard i decomposes its layers while shard
i+1 calibrates (original mode). Actors are gang-scheduled with a placement group (one GPU each where there are
GPUs, one CPU otherwise).
"""

from __future__ import annotations

import time

import numpy as np
import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from nesta_ray.pipeline.layerwise import MethodArgs
from nesta_ray.pipeline.plan import Plan
from nesta_ray.pipeline.shard import LayerShard


def shard_ranges(num_layers: int, workers: int) -> list[list[int]]:
    """Contiguous, balanced layer ranges for ``workers`` shards (ValueError if there are more shards than layers)."""
    if not 1 <= workers <= num_layers:
        raise ValueError(f"workers must be in [1, {num_layers}] for {num_layers} layers to calibrate, got {workers}")
    return [list(map(int, part)) for part in np.array_split(np.arange(num_layers), workers)]


def compress_sharded(folder: str, plan: Plan, ids: torch.Tensor, *, workers: int, micro_batch: int, mode: str,
                     args: MethodArgs, dtype: str) -> tuple[dict[str, dict], dict[str, float]]:
    """Calibrate and decompose every planned linear of the model in ``folder`` with ``workers`` layer shards.

    Returns per-linear results (factors and statistics, as from the embedded loop) and wall-clock phase times.
    """
    start = time.perf_counter()
    ranges = shard_ranges(max(plan.layers()) + 1, workers)
    use_gpu = bool(ray.cluster_resources().get("GPU"))
    bundle = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 1}
    group = placement_group([bundle] * workers, strategy="PACK")
    ray.get(group.ready())
    remote = ray.remote(LayerShard)
    try:
        actors = [
            remote.options(num_cpus=1, num_gpus=1 if use_gpu else 0, scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=k)).remote(
                folder, layers, Plan([p for p in plan.modules if p.layer in layers], plan.model_params),
                first=k == 0, dtype=dtype,
                args=args, mode=mode)
            for k, layers in enumerate(ranges)
        ]
        batches = actors[0].embed.remote(ids.numpy(), micro_batch)
        decompositions = []
        for actor in actors:
            batches = actor.calibrate.remote(batches)
            decompositions.append(actor.decompose.remote())
        results: dict[str, dict] = {}
        for part in ray.get(decompositions):
            results.update(part)
        per_actor = ray.get([a.timings.remote() for a in actors])
    finally:
        remove_placement_group(group)
    timings = {"sharded_total": time.perf_counter() - start}
    for key in ("load", "calibration", "decomposition"):
        timings[f"max_actor_{key}"] = max(t[key] for t in per_actor)
        timings[f"sum_actor_{key}"] = sum(t[key] for t in per_actor)
    return results, timings
