"""A layer-shard worker: owns a contiguous range of decoder layers, gathers their input statistics, decomposes them
and stages each finished layer. A plain class; the driver makes it a Ray actor (restartable: a restarted shard
recomputes only the layers that are not staged). Where the weights live and how a layer runs on the device is the
backend's business (``backends.py``); this class only orchestrates.

Hidden states arrive one micro-batch per call as numpy arrays (zero-copy through Ray's object store) with the
layer keyword arguments the first shard captured. ``original`` mode is batch-major (``forward``: one micro-batch
through every layer of the shard, so shards pipeline); ``propagate`` mode is layer-major (``calibrate``: a layer's
Gram is complete before it is compressed and its outputs recomputed).
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from nesta_ray.checkpoint.stage import LayerStage
from nesta_ray.method.decompose import Factors
from nesta_ray.model.calibration import GramAccumulator, InputStatistics
from nesta_ray.pipeline.backends import BackendSpec, open_backend, to_device
from nesta_ray.pipeline.tasks import Work, decompose_task

Batch = tuple[np.ndarray, dict[str, Any]]  # hidden states (b, t, d) and layer kwargs


@dataclass(frozen=True)
class ShardOptions:
    """How layer shards run: the model dtype, the forward backend, and (tests only) a layer before whose staging a
    shard's process exits once."""

    dtype: str = "float32"
    backend: BackendSpec = field(default_factory=BackendSpec)
    fail_at_layer: int | None = None


class LayerShard:
    """Decoder layers ``layers`` of the model in ``folder`` doing their part of ``work`` (its plan restricted to
    them), staging into ``stage``; the first shard also embeds the token ids.

    ``device`` overrides the compute device (default: the GPU this process sees, else the CPU).
    ``options.fail_at_layer`` (fault injection for tests) makes the process exit once, just before staging that
    layer.
    """

    def __init__(self, folder: str, layers: list[int], work: Work, stage: LayerStage,
                 options: ShardOptions = ShardOptions(), *, first: bool, device: str | None = None) -> None:
        start = time.perf_counter()
        torch.set_num_threads(work.threads)
        self.work, self.mode, self.layers, self.plan = work.subset(layers), work.mode, layers, work.plan.subset(layers)
        self.stage, self.fail_at_layer = stage, options.fail_at_layer
        self.backend = open_backend(options.backend, folder, layers, first=first, dtype=options.dtype,
                                    device=None if device is None else torch.device(device))
        self.grams: dict[int, dict[str, GramAccumulator]] = {}  # layer -> group -> fp64 sums on the host
        self.seen = 0  # micro-batches accumulated in order by ``forward``
        self.staged_at_start = self.stage.done()
        self.seconds = {"load": time.perf_counter() - start, "calibration": 0.0, "decomposition": 0.0}
        self.computed: list[int] = []
        self.task_seconds: list[float] = []  # per linear, as measured inside the decomposition

    def embed(self, ids: np.ndarray) -> Batch:
        """Token windows (b, L) of one micro-batch -> (hidden states entering layer 0, layer kwargs)."""
        hidden, kwargs = self.backend.embed(torch.from_numpy(ids))
        return hidden.numpy(), kwargs

    def _wanted(self, done: set[int]) -> dict[int, list[str]]:
        """Layers whose statistics are still needed, with their input groups."""
        return {i: list(self.plan.for_layer(i)) for i in self.layers if self.plan.for_layer(i) and i not in done}

    def _run(self, i: int, batches: list[tuple[torch.Tensor, dict]], record: bool) -> list[torch.Tensor]:
        """Layer ``i`` over ``batches`` (on the device), adding to its Grams when ``record``."""
        groups = self.plan.for_layer(i)
        modules = {g: m for g, m in self.backend.inputs_of(i).items() if g in groups} if record else {}
        accumulators = self.grams.setdefault(i, {}) if record else {}
        with torch.no_grad(), self.backend.loaded(i), InputStatistics(modules, accumulators):
            return [self.backend.run(i, h, kw) for h, kw in batches]

    def _on_device(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        hidden, kwargs = batch
        return torch.tensor(hidden, device=self.backend.device), to_device(kwargs, self.backend.device)

    def forward(self, index: int, batch: Batch) -> Batch:
        """Original mode: micro-batch ``index`` through every layer of the shard, adding to the Grams of layers
        not staged yet; returns the last layer's outputs for the next shard. Micro-batches must come in order
        0, 1, ...; one that does not (a restarted shard that lost earlier ones) passes through without statistics
        and ``decompose`` calibrates again from all inputs."""
        start = time.perf_counter()
        record = index == self.seen
        wanted = self._wanted(self.staged_at_start) if record else {}
        hidden, kwargs = self._on_device(batch)
        for i in self.layers:
            hidden = self._run(i, [(hidden, kwargs)], i in wanted)[0]
        self.seen += record
        self.seconds["calibration"] += time.perf_counter() - start
        return hidden.cpu().numpy(), batch[1]

    def calibrate(self, *batches: Batch) -> Batch | tuple[Batch, ...]:
        """Every micro-batch through the shard one layer at a time, gathering the statistics of layers not staged
        yet. In ``propagate`` mode each layer is compressed (or its staged factors installed) before its outputs
        are computed. Returns the shard's outputs, one per micro-batch (the value itself for one micro-batch, as
        Ray's ``num_returns=1`` expects)."""
        start = time.perf_counter()
        self.grams.clear()
        current = [self._on_device(b) for b in batches]
        done = self.stage.done()
        wanted = self._wanted(done)
        for i in self.layers:
            if self.mode == "propagate" and i in done and self.plan.for_layer(i):
                self.backend.install(i, self.stage.get(i))  # later layers must see this layer compressed
            outputs = self._run(i, current, i in wanted)
            if self.mode == "propagate" and i in wanted:
                self.seconds["calibration"] += time.perf_counter() - start
                self._decompose_layer(i)
                start = time.perf_counter()
                outputs = self._run(i, current, record=False)
            current = [(out, kw) for out, (_, kw) in zip(outputs, current)]
        self.seen = len(batches)
        self.seconds["calibration"] += time.perf_counter() - start
        outs = tuple((h.cpu().numpy(), kw) for (h, _), (_, kw) in zip(current, batches))
        return outs[0] if len(outs) == 1 else outs

    def _decompose_layer(self, i: int) -> None:
        start = time.perf_counter()
        factors: dict[str, Factors] = {}
        for group, plans in self.plan.for_layer(i).items():
            stats = self.grams[i].pop(group).stats()  # (n, n), (n,) float64; the sums are freed
            part = decompose_task(self.backend.weights(i, plans), plans, self.work.method, stats, self.work.threads)
            self.task_seconds += [f.seconds for f in part.values()]
            factors.update(part)
        del self.grams[i]
        if self.mode == "propagate":
            self.backend.install(i, factors)
        else:
            self.backend.release(i)  # original mode: this shard will not run the layer again
        if self.fail_at_layer == i and self.stage.mark(f"fault-injected-{i}"):
            os._exit(1)  # simulate a worker dying mid-layer: nothing of this layer is staged
        self.stage.put(i, factors)
        self.computed.append(i)
        self.seconds["decomposition"] += time.perf_counter() - start

    def decompose(self, *batches: Batch) -> dict[str, Any]:
        """Decompose and stage every planned layer not staged yet. ``batches`` are this shard's inputs: a shard
        that did not see all of them in order (a restarted one) calibrates again before decomposing. Returns the
        layers computed here, the phase seconds and the peak memory."""
        missing = [i for i in self.layers if self.plan.for_layer(i) and i not in self.stage.done()]
        if missing and (self.seen != len(batches) or any(i not in self.grams for i in missing)):
            self.calibrate(*batches)
        for i in missing:
            if i in self.grams:
                self._decompose_layer(i)
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
        device = self.backend.device
        return {"computed": list(self.computed), "seconds": dict(self.seconds), "peak_rss_bytes": peak_kib * 1024,
                "peak_device_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                "device": str(device), "decompose_seconds": sum(self.task_seconds)}

    def close(self) -> None:
        """Free the backend (DeepSpeed's engine); the actor is killed after."""
        self.backend.close()
