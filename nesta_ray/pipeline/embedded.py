"""The embedded loop: layer-by-layer calibration in this process, one Ray task per (layer, input group).

The calibration windows' hidden states walk through the decoder one layer at a time (like GPTQ's sequential
loop): hooks gather each layer's input statistics, one Ray task per input group decomposes its linears. In
``original`` mode the next layer sees the dense layer's outputs and decomposition overlaps calibration; in
``propagate`` mode the layer is replaced by its low-rank version first and the outputs are recomputed through it.
With the anchored fit (``method.anchored``, propagate mode) a second, dense stream of hidden states walks beside
the compressed one, and each layer's compressed-stream statistics are paired with it (``run_two_streams``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
from torch import nn

from nesta_ray.checkpoint.stage import LayerStage
from nesta_ray.method.decompose import Factors
from nesta_ray.method.factorize import Solver
from nesta_ray.model.arch import ArchSpec
from nesta_ray.model.calibration import Batch, layer_inputs, run_with_statistics
from nesta_ray.model.cross_calibration import run_two_streams
from nesta_ray.model.layers import decoder_layers, group_inputs, run_layer, weight_of
from nesta_ray.model.lowrank import install_factors
from nesta_ray.model.precision import forward_precision
from nesta_ray.pipeline.precision import device_solver
from nesta_ray.pipeline.ray_env import fetch
from nesta_ray.pipeline.tasks import Work, decompose_task
from nesta_ray.pipeline.uploads import BackgroundUploads
from nesta_ray.plan.linears import ModulePlan


@dataclass
class Timings:
    """Seconds spent in the calibration forward (hooks included) and waiting on decomposition tasks."""

    calibration: float = 0.0
    decomposition_wait: float = 0.0


def group_weights(model: nn.Module, plans: list[ModulePlan]) -> dict[str, np.ndarray]:
    """The float32 weights (out, in) of the given linears, as numpy arrays for a decomposition task."""
    return {p.name: weight_of(model.get_submodule(p.name)).detach().float().numpy() for p in plans}


def submit_groups(model: nn.Module, groups: Mapping[str, list[ModulePlan]], stats: Mapping[str, Any],
                  work: Work, solver: Solver | None = None) -> list[ray.ObjectRef]:
    """One Ray task per input group of a layer, factorising with ``solver`` (default: the CPU in float64). ``stats``
    maps group -> InputStats or an ObjectRef of one (so statistics put once can serve many decompositions)."""
    remote = ray.remote(num_cpus=work.threads)(decompose_task)
    return [remote.remote(group_weights(model, plans), plans, work.method, stats[group], work.threads, solver)
            for group, plans in groups.items()]


class _Loop:
    """One embedded run's state: results so far, layers waiting to be staged, pending tasks, timings."""

    def __init__(self, model: nn.Module, spec: ArchSpec, work: Work, stage: LayerStage | None,
                 on_group: Callable[[dict[str, Factors]], Any]) -> None:
        self.model, self.spec, self.work, self.stage, self.on_group = model, spec, work, stage, on_group
        self.results: dict[str, Factors] = {}
        self.layer_of = {p.name: p.layer for p in work.plan.modules}
        self.unstaged: dict[int, dict[str, Factors]] = {}
        self.pending: list[ray.ObjectRef] = []
        self.uploads = BackgroundUploads()
        self.timings = Timings()
        self.solver, self.solver_reason = device_solver(torch.device("cpu"), work)  # the tasks run on CPUs

    def collect(self, refs: list[ray.ObjectRef]) -> None:
        """Install and record finished groups; stage each layer once all its linears are in."""
        start = time.perf_counter()
        for group_result in fetch(refs, "a decomposition task"):
            self.results.update(group_result)
            install_factors(self.model, group_result)
            self.on_group(group_result)
            for name, f in group_result.items():
                layer = self.layer_of[name]
                done = self.unstaged.setdefault(layer, {})
                done[name] = f
                if self.stage is not None and len(done) == len(self.work.plan.names(layer)):
                    self.uploads.submit(self.stage.put, layer, dict(done))  # while the next layer calibrates
        self.timings.decomposition_wait += time.perf_counter() - start

    def from_stage(self, i: int) -> None:
        """Take layer ``i``'s factors from the stage (installed at once in propagate mode, at the end otherwise)."""
        assert self.stage is not None
        staged = self.stage.get(i)
        self.results.update(staged)
        if self.work.mode == "propagate":  # later layers must see this layer compressed
            install_factors(self.model, staged)
        self.on_group(staged)

    def layer(self, i: int, layer: nn.Module, batches: list[Batch], staged: bool) -> list[torch.Tensor]:
        """Calibrate (or take from the stage) and decompose decoder layer ``i``; returns its outputs."""
        start = time.perf_counter()
        groups = {} if staged else self.work.plan.for_layer(i)
        if staged:
            self.from_stage(i)
        precision = self.work.calibration_precision
        outputs, stats = run_with_statistics(layer, self.spec, groups, batches, precision)
        self.timings.calibration += time.perf_counter() - start
        refs = submit_groups(self.model, groups, stats, self.work, self.solver) if groups else []
        if self.work.mode == "propagate" and refs:
            self.collect(refs)
            start = time.perf_counter()
            with torch.no_grad(), forward_precision(batches[0][0].device, precision):
                outputs = [run_layer(layer, h, kw) for h, kw in batches]
            self.timings.calibration += time.perf_counter() - start
        else:
            ready, self.pending = ray.wait(self.pending + refs, num_returns=len(self.pending) + len(refs), timeout=0)
            self.collect(ready)
        return outputs

    def anchored_layer(self, i: int, layer: nn.Module, dense: list[Batch], compressed: list[Batch],
                       staged: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Propagate mode with the anchored fit: both streams through the dense layer ``i`` (the compressed
        one's statistics paired with the dense one's inputs), decompose, then the compressed stream again through
        the compressed layer. Returns the dense and the compressed stream's outputs."""
        start = time.perf_counter()
        groups = {} if staged else self.work.plan.for_layer(i)
        hooked = {g: m for g, m in group_inputs(layer, self.spec).items() if g in groups}
        dense_out, compressed_out, stats = run_two_streams(lambda h, kw: run_layer(layer, h, kw), hooked, dense,
                                                           compressed)
        self.timings.calibration += time.perf_counter() - start
        if staged:
            self.from_stage(i)
        elif groups:
            self.collect(submit_groups(self.model, groups, stats, self.work, self.solver))
        if staged or groups:
            start = time.perf_counter()
            with torch.no_grad():
                compressed_out = [run_layer(layer, h, kw) for h, kw in compressed]
            self.timings.calibration += time.perf_counter() - start
        return dense_out, compressed_out


def _next(batches: list[Batch], outputs: list[torch.Tensor]) -> list[Batch]:
    """The next layer's micro-batches: ``outputs`` with the layer kwargs of ``batches``."""
    return [(out, kw) for out, (_, kw) in zip(outputs, batches)]


def compress_layerwise(model: nn.Module, spec: ArchSpec, ids: torch.Tensor, work: Work, *,
                       stage: LayerStage | None = None, on_layer: Callable[[int], Any] = lambda i: None,
                       on_group: Callable[[dict[str, Factors]], Any] = lambda r: None,
                       ) -> tuple[dict[str, Factors], Timings]:
    """Calibrate on token windows ``ids`` (N, L), decompose every planned linear with Ray, install the factors.

    With a ``stage``, each finished layer is staged and layers already staged are taken from it instead of being
    recomputed. Returns the factors per linear and timings. Ray must be initialised. Raises a task's NestaError
    as itself, any other task failure as PipelineError.
    """
    loop = _Loop(model, spec, work, stage, on_group)
    done = stage.done() if stage is not None else set()
    start = time.perf_counter()
    batches = layer_inputs(model, spec, ids, work.micro_batch)
    loop.timings.calibration += time.perf_counter() - start
    last = max(work.plan.layers(), default=-1)
    anchored = work.mode == "propagate" and work.method.anchored
    dense = batches  # the dense stream of the anchored fit (unused otherwise)
    for i, layer in enumerate(decoder_layers(model, spec)):
        if i > last:
            break  # nothing left to compress: later layers need no calibration
        if anchored:
            dense_out, outputs = loop.anchored_layer(i, layer, dense, batches, i in done)
            dense = _next(dense, dense_out)
        else:
            outputs = loop.layer(i, layer, batches, i in done)
        batches = _next(batches, outputs)
        on_layer(i)
    loop.collect(loop.pending)
    loop.uploads.wait()  # every layer staged before the caller is told so
    if work.mode == "original":  # staged layers were kept dense while later layers calibrated
        install_factors(model, {k: v for k, v in loop.results.items() if loop.layer_of[k] in done})
    return loop.results, loop.timings
