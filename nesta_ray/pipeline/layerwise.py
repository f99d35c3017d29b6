"""Layer-by-layer calibration with Ray decomposition tasks.

The calibration windows' hidden states walk through the decoder one layer at a time (like GPTQ's sequential
loop): hooks gather each layer's input statistics, one Ray task per input group decomposes its linears. In
``original`` mode the next layer sees the dense layer's outputs and decomposition overlaps calibration; in
``propagate`` mode the layer is replaced by its low-rank version first and the outputs are recomputed through it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

import ray
import torch
from torch import nn

from nesta_ray.calibration import GramAccumulator, InputStatistics
from nesta_ray.errors import NestaError
from nesta_ray.models import ArchSpec, LowRankLinear, capture_layer_inputs, decoder_layers, group_inputs, run_layer, set_submodule
from nesta_ray.pipeline.plan import ModulePlan, Plan
from nesta_ray.pipeline.staging import LayerStage
from nesta_ray.pipeline.tasks import decompose_group_arrays


@dataclass(frozen=True)
class MethodArgs:
    """The decomposition knobs, passed as plain values to every task."""

    method: str
    k1_fraction: float
    damping: float
    alpha: float
    threads: int
    k1_tolerance: float | None = None  # nsvd: per-matrix k1 from the whitened spectrum instead of k1_fraction


@dataclass
class Timings:
    """Seconds spent in the calibration forward (hooks included) and waiting on decomposition tasks."""

    calibration: float = 0.0
    decomposition_wait: float = 0.0


def layer_inputs(model: nn.Module, spec: ArchSpec, ids: torch.Tensor, micro_batch: int) -> list[tuple[torch.Tensor, dict]]:
    """Per micro-batch: hidden states (b, t, d) entering decoder layer 0 and the layer keyword arguments."""
    with torch.no_grad():
        return [capture_layer_inputs(model, spec, ids[i : i + micro_batch]) for i in range(0, ids.shape[0], micro_batch)]


def group_weights(model: nn.Module, plans: list[ModulePlan]) -> dict[str, np.ndarray]:
    """The float32 weights (out, in) of the given linears, as numpy arrays for a decomposition task."""
    return {p.name: model.get_submodule(p.name).weight.detach().float().numpy() for p in plans}


def run_with_statistics(layer: nn.Module, spec: ArchSpec, groups: Mapping[str, Any],
                        batches: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], dict, dict]:
    """Run every micro-batch through ``layer`` with hooks on the input groups named in ``groups``.

    Returns the outputs (one (b, t, d) tensor per micro-batch) and, per hooked group, the normalised Gram (n, n)
    and abs-mean (n,) as float64 numpy arrays.
    """
    hooked = {g: m for g, m in group_inputs(layer, spec).items() if g in groups}
    with torch.no_grad(), InputStatistics(hooked) as stats:
        outputs = [run_layer(layer, h, kw) for h, kw in batches]
    accs = stats.accumulators
    return outputs, {g: a.gram().numpy() for g, a in accs.items()}, {g: a.abs_mean().numpy() for g, a in accs.items()}


class HostGramAccumulator(GramAccumulator):
    """A ``GramAccumulator`` whose fp64 sums (n, n) and (n,) stay in host memory while each batch's fp32 product
    runs on the input's device: a GPU holds one product, not the sums of every layer. The numbers are those of
    ``GramAccumulator`` (the same fp32 product, added in fp64)."""

    def __init__(self, n: int) -> None:
        super().__init__(n, device="cpu")

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.width).to(torch.float32)  # (T, n)
        self.gram_sum.add_((x.T @ x).cpu())
        self.abs_sum.add_(x.abs().sum(dim=0).cpu())
        self.tokens += x.shape[0]


def host_statistics(modules: Mapping[str, nn.Module], accumulators: dict[str, GramAccumulator]) -> InputStatistics:
    """Gram hooks on ``modules`` (group -> linear) that add into ``accumulators`` (group -> accumulator, created
    on the host at first use), so statistics can grow over many calls."""
    for group, module in modules.items():
        accumulators.setdefault(group, HostGramAccumulator(module.in_features))
    stats = InputStatistics(modules)
    stats.accumulators = accumulators
    return stats


def submit_groups(model: nn.Module, groups: dict[str, list[ModulePlan]], grams: dict[str, Any],
                  abs_means: dict[str, Any], args: MethodArgs) -> list[ray.ObjectRef]:
    """One Ray task per input group of a layer. ``grams``/``abs_means`` map group -> (n, n)/(n,) float64 numpy
    arrays or ObjectRefs of them (so statistics put once can serve many decompositions)."""
    remote = ray.remote(num_cpus=args.threads)(decompose_group_arrays)
    refs = []
    for group, plans in groups.items():
        weights = group_weights(model, plans)
        refs.append(remote.remote(
            weights, {p.name: p.rank for p in plans}, args.method, grams[group], abs_means[group],
            args.k1_fraction, args.damping, args.alpha, args.threads, args.k1_tolerance,
        ))
    return refs


def get_results(refs: list[ray.ObjectRef]) -> list:
    """``ray.get`` that re-raises a nesta_ray error raised inside a task as itself, not wrapped by Ray."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, NestaError):
            raise err.cause from None
        raise


def install_factors(model: nn.Module, results: dict[str, dict]) -> None:
    """Replace each named linear by a LowRankLinear holding its factors (in the linear's dtype)."""
    for name, r in results.items():
        old = model.get_submodule(name)
        dtype = old.weight.dtype
        A, B = torch.from_numpy(r["A"].copy()).to(dtype), torch.from_numpy(r["B"].copy()).to(dtype)
        bias = None if old.bias is None else old.bias.detach()
        set_submodule(model, name, LowRankLinear.from_factors(A, B, bias))


def compress_layerwise(
    model: nn.Module, spec: ArchSpec, plan: Plan, ids: torch.Tensor, *, micro_batch: int, mode: str,
    args: MethodArgs, stage: LayerStage | None = None, on_layer: Callable[[int], Any] = lambda i: None,
    on_group: Callable[[dict[str, dict]], Any] = lambda r: None,
) -> tuple[dict[str, dict], Timings]:
    """Calibrate on token windows ``ids`` (N, L), decompose every planned linear with Ray, install the factors.

    With a ``stage``, each finished layer is staged and layers already staged are taken from it instead of being
    recomputed. Returns per-linear results (factors and statistics) and timings. Ray must be initialised.
    """
    timings = Timings()
    results: dict[str, dict] = {}
    pending: list[ray.ObjectRef] = []
    done = stage.done() if stage is not None else set()
    layer_of = {p.name: p.layer for p in plan.modules}
    unstaged: dict[int, dict[str, dict]] = {}

    def collect(refs: list[ray.ObjectRef]) -> None:
        start = time.perf_counter()
        for group_result in get_results(refs):
            results.update(group_result)
            install_factors(model, group_result)
            on_group(group_result)
            for name, r in group_result.items():
                layer = unstaged.setdefault(layer_of[name], {})
                layer[name] = r
                if stage is not None and len(layer) == sum(len(g) for g in plan.for_layer(layer_of[name]).values()):
                    stage.put(layer_of[name], layer)
        timings.decomposition_wait += time.perf_counter() - start

    start = time.perf_counter()
    batches = layer_inputs(model, spec, ids, micro_batch)
    timings.calibration += time.perf_counter() - start
    for i, layer in enumerate(decoder_layers(model, spec)):
        if i > max(plan.layers(), default=-1):
            break  # nothing left to compress: later layers need no calibration
        start = time.perf_counter()
        groups = {} if i in done else plan.for_layer(i)
        if i in done:
            staged = stage.get(i)
            results.update(staged)
            if mode == "propagate":  # later layers must see this layer compressed
                install_factors(model, staged)
            on_group(staged)
        outputs, grams, abs_means = run_with_statistics(layer, spec, groups, batches)
        timings.calibration += time.perf_counter() - start
        refs = submit_groups(model, groups, grams, abs_means, args) if groups else []
        if mode == "propagate" and refs:
            collect(refs)
            start = time.perf_counter()
            with torch.no_grad():
                outputs = [run_layer(layer, h, kw) for h, kw in batches]
            timings.calibration += time.perf_counter() - start
        else:
            ready, pending = ray.wait(pending + refs, num_returns=len(pending) + len(refs), timeout=0)
            collect(ready)
        batches = [(out, kw) for out, (_, kw) in zip(outputs, batches)]
        on_layer(i)
    collect(pending)
    if mode == "original":  # staged layers were kept dense while later layers calibrated
        install_factors(model, {k: v for k, v in results.items() if layer_of[k] in done})
    return results, timings


def collect_statistics(model: nn.Module, spec: ArchSpec, layers: list[int], ids: torch.Tensor,
                       micro_batch: int) -> dict[int, tuple[dict, dict]]:
    """Per layer in ``layers``: (grams, abs_means) by input group, from the dense model (one forward pass,
    nothing decomposed), as ``run_with_statistics`` returns them."""
    batches = layer_inputs(model, spec, ids, micro_batch)
    stats: dict[int, tuple[dict, dict]] = {}
    for i, layer in enumerate(decoder_layers(model, spec)):
        if i > max(layers, default=-1):
            break
        outputs, grams, abs_means = run_with_statistics(layer, spec, spec.groups if i in layers else {}, batches)
        if i in layers:
            stats[i] = (grams, abs_means)
        batches = [(out, kw) for out, (_, kw) in zip(outputs, batches)]
    return stats
