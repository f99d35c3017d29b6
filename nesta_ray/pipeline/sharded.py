"""Layer-sharded calibration and decomposition: N Ray actors, each owning a contiguous range of decoder layers.

Hidden states flow from shard to shard through Ray's object store, one object per micro-batch. In ``original``
mode the shards form a pipeline (shard i runs micro-batch b+1 while shard i+1 runs b; Ray runs one caller's calls
to an actor in order) and shard i decomposes its layers while shard i+1 still calibrates; ``propagate`` mode hands
on all micro-batches of a shard at once (each layer is compressed before its outputs are computed). Actors are
gang-scheduled with a placement group (``threads_per_task`` CPUs and, where the cluster has GPUs, one GPU each)
and restarted by Ray if their process dies; finished layers are staged, so a restarted shard, or a rerun of the
whole job, recomputes only what is missing.
"""

from __future__ import annotations

import time

import numpy as np
import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from nesta_ray.errors import ConfigError, NestaError, PipelineError
from nesta_ray.pipeline.backends import BackendSpec
from nesta_ray.pipeline.layerwise import MethodArgs
from nesta_ray.pipeline.plan import Plan
from nesta_ray.pipeline.shard import LayerShard, StageRef

MAX_RESTARTS = 2
PLACEMENT_TIMEOUT_S = 60


def shard_ranges(num_layers: int, workers: int) -> list[list[int]]:
    """Contiguous, balanced layer ranges for ``workers`` shards (ValueError if there are more shards than layers)."""
    if not 1 <= workers <= num_layers:
        raise ValueError(f"workers must be in [1, {num_layers}] for {num_layers} layers to calibrate, got {workers}")
    return [list(map(int, part)) for part in np.array_split(np.arange(num_layers), workers)]


def compress_sharded(folder: str, plan: Plan, ids: torch.Tensor, *, workers: int, micro_batch: int, mode: str,
                     args: MethodArgs, dtype: str, stage: StageRef, backend: BackendSpec = BackendSpec(),
                     fail_at_layer: int | None = None) -> dict:
    """Calibrate, decompose and stage every planned linear of the model in ``folder`` with ``workers`` shards.

    Returns {"computed": layers decomposed in this call, "timings": phase seconds, "actors": per-actor layers,
    peak memory and seconds}. The factors are in the stage. Raises ConfigError when the cluster cannot place the
    shards, PipelineError when a shard fails for good, and a shard's own NestaError as itself.
    """
    start = time.perf_counter()
    ranges = shard_ranges(max(plan.layers()) + 1, workers)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    bundle = {"CPU": args.threads, **({"GPU": 1} if gpus else {})}
    group = placement_group([bundle] * workers, strategy="PACK")
    remote = ray.remote(LayerShard)
    resources = dict(num_cpus=args.threads, num_gpus=1 if gpus else 0, max_restarts=MAX_RESTARTS,
                     max_task_retries=MAX_RESTARTS)
    try:
        try:
            ray.get(group.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise ConfigError(f"runtime.workers: the cluster cannot place {workers} shards of {args.threads} CPU(s)"
                              f"{' and 1 GPU' if gpus else ''} within {PLACEMENT_TIMEOUT_S} s "
                              f"({ray.cluster_resources().get('CPU', 0):.0f} CPUs, {gpus} GPUs in all); lower "
                              "runtime.workers or runtime.threads_per_task") from None
        actors = [
            remote.options(**resources, scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=k)).remote(
                folder, layers, Plan([p for p in plan.modules if p.layer in layers], plan.model_params),
                first=k == 0, dtype=dtype, args=args, mode=mode, stage=stage, backend=backend,
                fail_at_layer=fail_at_layer)
            for k, layers in enumerate(ranges)
        ]
        summaries = _run_shards(actors, ids, micro_batch, mode)
        try:
            summaries = ray.get(summaries)
            ray.get([actor.close.remote() for actor in actors])
        except ray.exceptions.RayError as err:
            if isinstance(getattr(err, "cause", None), NestaError):
                raise err.cause from None  # a user-facing error inside a shard: rerunning would not help
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise PipelineError(f"a layer shard failed after {MAX_RESTARTS} restarts ({type(err).__name__}: "
                                f"{first}); finished layers are staged under {stage.root_uri}/staging, "
                                "rerun the job to resume") from None
        for actor in actors:
            ray.kill(actor)
    finally:
        remove_placement_group(group)
    timings = {"sharded_total": time.perf_counter() - start}
    for key in ("load", "calibration", "decomposition"):
        timings[f"max_actor_{key}"] = max(s["seconds"][key] for s in summaries)
        timings[f"sum_actor_{key}"] = sum(s["seconds"][key] for s in summaries)
    return {"computed": sorted(i for s in summaries for i in s["computed"]), "timings": timings,
            "actors": [{"layers": r, "device": s["device"], "peak_rss_bytes": s["peak_rss_bytes"],
                        "peak_device_bytes": s["peak_device_bytes"], "seconds": s["seconds"],
                        "decompose_seconds": s["decompose_seconds"]} for r, s in zip(ranges, summaries)]}


def _run_shards(actors: list, ids: torch.Tensor, micro_batch: int, mode: str) -> list[ray.ObjectRef]:
    """Submit every call: embed each micro-batch on the first shard, pass micro-batches from shard to shard
    (``forward`` per micro-batch in original mode, ``calibrate`` over all of them in propagate mode), then
    ``decompose`` on each shard with its inputs (for a restarted shard to calibrate again). Returns the
    summaries' refs."""
    refs = [actors[0].embed.remote(ids[s : s + micro_batch].numpy()) for s in range(0, ids.shape[0], micro_batch)]
    summaries = []
    for actor in actors:
        inputs = refs
        if mode == "original":
            refs = [actor.forward.remote(b, ref) for b, ref in enumerate(inputs)]
        else:
            out = actor.calibrate.options(num_returns=len(inputs)).remote(*inputs)
            refs = list(out) if len(inputs) > 1 else [out]
        summaries.append(actor.decompose.remote(*inputs))
    return summaries
