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

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from nesta_ray.checkpoint.stage import LayerStage
from nesta_ray.errors import ConfigError, ShardStateLost
from nesta_ray.io.sources import ModelSource
from nesta_ray.pipeline.backends import ShardPart
from nesta_ray.pipeline.ray_env import fetch
from nesta_ray.pipeline.shard_weights import DENSE, Weights
from nesta_ray.pipeline.shard_worker import LayerShard, ShardOptions
from nesta_ray.pipeline.tasks import Work
from nesta_ray.plan.sizing import shard_ranges

MAX_RESTARTS = 2
PLACEMENT_TIMEOUT_S = 60


class ShardGroup:
    """``workers`` layer-shard actors over every decoder layer of the model at ``source``, gang-scheduled in a
    placement group (``work.threads`` CPUs and, where the cluster has GPUs, one GPU each), restarted by Ray if
    their process dies; the last one holds the final norm and the head. Use as a context manager: entering places
    and starts the actors, leaving stops them. Raises ConfigError when the cluster cannot place them."""

    def __init__(self, source: ModelSource, work: Work, stage: LayerStage | None, workers: int,
                 options: ShardOptions | None = None) -> None:
        self.source, self.work, self.stage, self.options = source, work, stage, options or ShardOptions()
        config = json.loads((Path(source.folder) / "config.json").read_text())
        self.ranges = shard_ranges(int(config["num_hidden_layers"]), workers)
        self.actors: list[Any] = []
        self.prepared_inputs: list[list[Any]] = []  # each shard's inputs to ``prepare``, to prepare a restarted one

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
                self.source, ShardPart(layers, first=k == 0, last=k == workers - 1), self.work, self.stage,
                self.options)
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
        where = f"finished layers are staged under {self.stage.uri}, rerun the job to resume" if self.stage else ""
        return fetch(refs, f"a layer shard (after {MAX_RESTARTS} restarts)", where)

    def compress(self, ids: torch.Tensor) -> dict[str, Any]:
        """Calibrate, decompose and stage every planned linear on token windows ``ids`` (N, L); the shards then
        compute with the staged factors. Returns {"computed": layers decomposed here, "timings": phase seconds,
        "actors": per-actor layers, peak memory and seconds}."""
        start = time.perf_counter()
        summaries = self.fetch(_run_shards(self.actors, ids, self.work.micro_batch, self.work.mode))
        timings = {"sharded_total": time.perf_counter() - start}
        for key in ("load", "calibration", "decomposition"):
            timings[f"max_actor_{key}"] = max(s["seconds"][key] for s in summaries)
            timings[f"sum_actor_{key}"] = sum(s["seconds"][key] for s in summaries)
        return {"computed": sorted(i for s in summaries for i in s["computed"]), "timings": timings,
                "actors": self._reports(summaries)}

    def _reports(self, summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        keys = ("device", "peak_rss_bytes", "peak_device_bytes", "seconds", "decompose_seconds", "bytes_read",
                "restarted", "decompose_precision")
        return [{"layers": r, **{k: s[k] for k in keys}} for r, s in zip(self.ranges, summaries)]

    def reports(self) -> list[dict[str, Any]]:
        """Per shard, so far: its layers, device, peak memory, phase seconds (load, calibration, decomposition,
        evaluation, drift: busy time inside the shard, since its last restart), the weight bytes it read and
        whether Ray restarted it."""
        return self._reports(self.fetch([actor.summary.remote() for actor in self.actors]))

    def _rebuilding(self, call: Callable[[], Any]) -> Any:
        """``call()``; when a shard restarted since ``prepare`` lost its SVDs, have it prepare again from the same
        inputs and call once more."""
        try:
            return call()
        except ShardStateLost:
            if not self.prepared_inputs:
                raise
            self.fetch([a.ensure_prepared.remote(*mine) for a, mine in zip(self.actors, self.prepared_inputs)])
            return call()

    def _infer(self, ids: torch.Tensor, weights: Weights, batch_size: int, targets: bool) -> list[np.ndarray]:
        """Micro-batches of ``batch_size`` windows of ``ids`` (W, L) pipelined through the shards; the last shard's
        outputs per micro-batch (NLL sums with ``targets``, else next tokens)."""
        return self._rebuilding(lambda: self._pipelined(ids, weights, batch_size, targets))

    def _pipelined(self, ids: torch.Tensor, weights: Weights, batch_size: int, targets: bool) -> list[np.ndarray]:
        starts = list(range(0, ids.shape[0], batch_size))
        refs = [self.actors[0].embed.remote(ids[s : s + batch_size].numpy()) for s in starts]
        for k, actor in enumerate(self.actors):
            last = k == len(self.actors) - 1
            refs = [actor.infer.remote(ref, weights, ids[s : s + batch_size].numpy() if last and targets else None)
                    for s, ref in zip(starts, refs)]
        return self.fetch(refs)

    def window_nll(self, windows: torch.Tensor, weights: Weights, batch_size: int = 1) -> torch.Tensor:
        """Summed next-token NLL of each window (W,) for token windows (W, L) under ``weights``."""
        return torch.from_numpy(np.concatenate(self._infer(windows, weights, batch_size, targets=True)))

    def next_token(self, seq: torch.Tensor, weights: Weights) -> int:
        """The arg-max next token after sequence ``seq`` (1, t) under ``weights``."""
        return int(self._infer(seq, weights, 1, targets=False)[0][0])

    def _dense_pass(self, ids: torch.Tensor) -> list[list[Any]]:
        """Original-mode calibration of every planned layer on the dense weights, pipelined; returns each shard's
        input refs (which the closing calls take, so that a restarted shard can calibrate again)."""
        mb = self.work.micro_batch
        refs = [self.actors[0].embed.remote(ids[s : s + mb].numpy()) for s in range(0, ids.shape[0], mb)]
        inputs = []
        for actor in self.actors:
            inputs.append(refs)
            refs = [actor.forward.remote(b, ref, True) for b, ref in enumerate(refs)]
        return inputs

    def prepare(self, ids: torch.Tensor) -> None:
        """The automatic ratio's shared work on calibration windows ``ids``: each shard's scaled SVDs."""
        self.prepared_inputs = self._dense_pass(ids)
        self.fetch([actor.prepare.remote(*mine) for actor, mine in zip(self.actors, self.prepared_inputs)])

    def sensitivity(self, ids: torch.Tensor) -> dict[str, np.ndarray]:
        """After ``prepare``: each planned linear's sensitivity curve from one backward pass of the summed NLL of
        windows ``ids`` (N, L): the dense forward shard to shard, then the gradients back from the last shard to
        the first, one micro-batch per call; a shard restarted meanwhile prepares again and the pass is redone."""
        return self._rebuilding(lambda: self._sensitivity(ids))

    def _sensitivity(self, ids: torch.Tensor) -> dict[str, np.ndarray]:
        mb = self.work.micro_batch
        starts = list(range(0, ids.shape[0], mb))
        refs = [self.actors[0].embed.remote(ids[s : s + mb].numpy()) for s in starts]
        inputs = []
        for actor in self.actors[:-1]:
            inputs.append(refs)
            refs = [actor.infer.remote(ref, DENSE, None, "sensitivity") for ref in refs]
        inputs.append(refs)
        grads = [self.actors[-1].backward.remote(b, ref, ids[s : s + mb].numpy())
                 for b, (s, ref) in enumerate(zip(starts, inputs[-1]))]
        for k in range(len(self.actors) - 2, -1, -1):
            grads = [self.actors[k].backward.remote(b, inputs[k][b], None, g) for b, g in enumerate(grads)]
        self.fetch(grads)
        parts = self.fetch([actor.curves.remote(len(starts)) for actor in self.actors])
        return {name: curve for part in parts for name, curve in part.items()}

    def stage_ratio(self, weights: Weights) -> list[int]:
        """Stage the factors at the chosen ratio; returns the layers staged."""
        parts = self._rebuilding(lambda: self.fetch([a.stage_ratio.remote(weights) for a in self.actors]))
        self.prepared_inputs = []  # the search is over: let Ray free the calibration hidden states
        return sorted(i for part in parts for i in part)

    def drift_errors(self, ids: torch.Tensor, weights: Weights) -> dict[str, float]:
        """Each planned linear's relative output error under the dense Grams of windows ``ids``, for the published
        factors ``weights`` names; the shards score their own layers."""
        inputs = self._dense_pass(ids)
        parts = self.fetch([actor.drift.remote(weights, *mine) for actor, mine in zip(self.actors, inputs)])
        return {name: e for part in parts for name, e in part.items()}


def compress_sharded(source: ModelSource, ids: torch.Tensor, work: Work, stage: LayerStage, workers: int,
                     options: ShardOptions | None = None) -> dict[str, Any]:
    """Calibrate, decompose and stage every planned linear of the model at ``source`` with ``workers`` shards
    (``ShardGroup.compress``). Raises ConfigError when the cluster cannot place the shards, PipelineError when a
    shard fails for good, and a shard's own NestaError as itself."""
    with ShardGroup(source, work, stage, workers, options) as shards:
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
