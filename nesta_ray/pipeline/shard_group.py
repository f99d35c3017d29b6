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
from typing import Any

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from nesta_ray.checkpoint.stage import LayerStage
from nesta_ray.errors import ConfigError
from nesta_ray.pipeline.ray_env import fetch
from nesta_ray.pipeline.shard_worker import LayerShard, ShardOptions
from nesta_ray.pipeline.tasks import Work
from nesta_ray.plan.sizing import shard_ranges

MAX_RESTARTS = 2
PLACEMENT_TIMEOUT_S = 60


class ShardGroup:
    """``workers`` layer-shard actors over the model in ``folder``, gang-scheduled in a placement group
    (``work.threads`` CPUs and, where the cluster has GPUs, one GPU each), restarted by Ray if their process dies.
    Use as a context manager: entering places and starts the actors, leaving stops them. Raises ConfigError when
    the cluster cannot place them."""

    def __init__(self, folder: str, work: Work, stage: LayerStage, workers: int,
                 options: ShardOptions | None = None) -> None:
        self.folder, self.work, self.stage, self.options = folder, work, stage, options or ShardOptions()
        self.ranges = shard_ranges(max(work.plan.layers()) + 1, workers)
        self.actors: list[Any] = []

    def __enter__(self) -> ShardGroup:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        threads, workers = self.work.threads, len(self.ranges)
        self.group = placement_group([{"CPU": threads, **({"GPU": 1} if gpus else {})}] * workers, strategy="PACK")
        try:
            ray.get(self.group.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.group)
            raise ConfigError(f"runtime.workers: the cluster cannot place {workers} shards of {threads} CPU(s)"
                              f"{' and 1 GPU' if gpus else ''} within {PLACEMENT_TIMEOUT_S} s "
                              f"({ray.cluster_resources().get('CPU', 0):.0f} CPUs, {gpus} GPUs in all); lower "
                              "runtime.workers or runtime.threads_per_task") from None
        remote = ray.remote(LayerShard)
        resources: dict[str, Any] = dict(num_cpus=threads, num_gpus=1 if gpus else 0, max_restarts=MAX_RESTARTS,
                                         max_task_retries=MAX_RESTARTS)
        self.actors = [
            remote.options(**resources, scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self.group, placement_group_bundle_index=k)).remote(
                self.folder, layers, self.work, self.stage, self.options, first=k == 0)
            for k, layers in enumerate(self.ranges)
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self.fetch([actor.close.remote() for actor in self.actors])
        finally:
            for actor in self.actors:
                ray.kill(actor)
            remove_placement_group(self.group)

    def fetch(self, refs: Any) -> Any:
        """The shards' results; a shard that fails for good becomes one PipelineError (its NestaError as itself)."""
        return fetch(refs, f"a layer shard (after {MAX_RESTARTS} restarts)",
                     f"finished layers are staged under {self.stage.uri}, rerun the job to resume")

    def compress(self, ids: torch.Tensor) -> dict[str, Any]:
        """Calibrate, decompose and stage every planned linear on token windows ``ids`` (N, L). Returns
        {"computed": layers decomposed here, "timings": phase seconds, "actors": per-actor layers, peak memory and
        seconds}; the factors are in the stage."""
        start = time.perf_counter()
        summaries = self.fetch(_run_shards(self.actors, ids, self.work.micro_batch, self.work.mode))
        timings = {"sharded_total": time.perf_counter() - start}
        for key in ("load", "calibration", "decomposition"):
            timings[f"max_actor_{key}"] = max(s["seconds"][key] for s in summaries)
            timings[f"sum_actor_{key}"] = sum(s["seconds"][key] for s in summaries)
        return {"computed": sorted(i for s in summaries for i in s["computed"]), "timings": timings,
                "actors": [{"layers": r, **{k: s[k] for k in ("device", "peak_rss_bytes", "peak_device_bytes",
                                                              "seconds", "decompose_seconds")}}
                           for r, s in zip(self.ranges, summaries)]}


def compress_sharded(folder: str, ids: torch.Tensor, work: Work, stage: LayerStage, workers: int,
                     options: ShardOptions | None = None) -> dict[str, Any]:
    """Calibrate, decompose and stage every planned linear of the model in ``folder`` with ``workers`` shards
    (``ShardGroup.compress``). Raises ConfigError when the cluster cannot place the shards, PipelineError when a
    shard fails for good, and a shard's own NestaError as itself."""
    with ShardGroup(folder, work, stage, workers, options) as shards:
        return shards.compress(ids)


def _run_shards(actors: list[Any], ids: torch.Tensor, micro_batch: int, mode: str) -> list[ray.ObjectRef]:
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
