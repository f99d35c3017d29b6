"""Calibration: Gram matrices and activation abs-means of linear-layer inputs, gathered by hooks, layer by layer.

Pure torch, no I/O. Convention: sums are kept in float64 (from one float32-accurate product per batch, computed on
the input's device at the calibration precision: ``model.precision``) together with the token count, in the
accumulator's own memory (the host by default, so a GPU holds one product, not the sums of every layer);
``stats()`` returns the normalised Gram G = XᵀX / T that the decomposition expects. Every path that gathers
statistics (the embedded loop, layer shards, the automatic ratio, drift scoring) runs through this module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from nesta_ray.errors import NumericalError
from nesta_ray.method.decompose import InputStats
from nesta_ray.model.arch import ArchSpec
from nesta_ray.model.layers import LayerKwargs, capture_layer_inputs, decoder_layers, group_inputs, run_layer
from nesta_ray.model.precision import forward_precision, gram_product

Batch = tuple[torch.Tensor, LayerKwargs]  # hidden states (b, t, d) entering a layer and its keyword arguments


class GramAccumulator:
    """Running XᵀX (n, n) and Σ|x| (n,) over every token of one layer input of width n, summed on ``device``, the
    products at ``precision`` ("float32" | "bfloat16")."""

    def __init__(self, n: int, device: torch.device | str = "cpu", precision: str = "float32") -> None:
        self.precision = precision
        self.gram_sum = torch.zeros(n, n, dtype=torch.float64, device=device)  # (n, n)
        self.abs_sum = torch.zeros(n, dtype=torch.float64, device=device)  # (n,)
        self.tokens = 0

    @property
    def width(self) -> int:
        return self.gram_sum.shape[0]

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs x (..., n): one float32-accurate product xᵀx on x's device at the accumulator's
        precision, accumulated in fp64 here."""
        x = x.detach().reshape(-1, self.width)  # (T, n)
        self.gram_sum.add_(gram_product(x, self.precision).to(self.gram_sum.device))
        self.abs_sum.add_(x.to(torch.float32).abs().sum(dim=0).to(self.abs_sum.device))
        self.tokens += x.shape[0]

    def merge(self, other: GramAccumulator) -> None:
        """Fold another accumulator of the same width into this one (e.g. from another worker)."""
        if other.width != self.width:
            raise ValueError(f"cannot merge a Gram of width {other.width} into one of width {self.width}")
        self.gram_sum.add_(other.gram_sum.to(self.gram_sum.device))
        self.abs_sum.add_(other.abs_sum.to(self.abs_sum.device))
        self.tokens += other.tokens

    def gram(self) -> torch.Tensor:
        """Normalised Gram XᵀX / T (n, n), fp64. Raises NumericalError when no token was seen or sums are not finite."""
        return self._mean(self.gram_sum, "Gram")

    def abs_mean(self) -> torch.Tensor:
        """Mean |x| per input channel (n,), fp64, for ASVD's scaling. Errors as ``gram``."""
        return self._mean(self.abs_sum, "activation abs-sum")

    def stats(self) -> InputStats:
        """The normalised statistics for the decomposition. Errors as ``gram``."""
        return InputStats(self.gram(), self.abs_mean(), self.tokens)

    def _mean(self, total: torch.Tensor, what: str) -> torch.Tensor:
        if self.tokens == 0:
            raise NumericalError(f"no calibration token reached this layer: its {what} is empty")
        if not bool(torch.isfinite(total).all()):
            raise NumericalError(f"the {what} accumulated non-finite values; the model overflows on this input")
        return total / self.tokens


class InputStatistics:
    """Forward pre-hooks that feed one ``GramAccumulator`` per module input; use as a context manager.

    ``modules`` maps a group name (one per distinct input: q/k/v share one) to the module whose input is recorded.
    ``accumulators`` (group -> accumulator, created on ``sums_device`` at first use, with products at
    ``precision``) may be passed in so that statistics grow over many calls.
    """

    def __init__(self, modules: Mapping[str, nn.Module], accumulators: dict[str, GramAccumulator] | None = None,
                 sums_device: torch.device | str = "cpu", precision: str = "float32") -> None:
        self.modules, self.precision = dict(modules), precision
        self.accumulators: dict[str, GramAccumulator] = {} if accumulators is None else accumulators
        self.sums_device = sums_device
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> InputStatistics:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            acc = self.accumulators.get(name)
            if acc is None:
                acc = self.accumulators[name] = GramAccumulator(x.shape[-1], self.sums_device, self.precision)
            acc.add(x)

        return record


def layer_inputs(model: nn.Module, spec: ArchSpec, ids: torch.Tensor, micro_batch: int) -> list[Batch]:
    """Per micro-batch of token windows ``ids`` (N, L): hidden states (b, t, d) entering decoder layer 0 and the
    layer keyword arguments."""
    with torch.no_grad():
        return [capture_layer_inputs(model, spec, ids[i : i + micro_batch]) for i in range(0, ids.shape[0],
                                                                                           micro_batch)]


def run_with_statistics(layer: nn.Module, spec: ArchSpec, groups: Any, batches: list[Batch],
                        precision: str = "float32") -> tuple[list[torch.Tensor], dict[str, InputStats]]:
    """Run every micro-batch through ``layer`` at the calibration ``precision`` with hooks on the input groups named
    in ``groups`` (any container of group names). Returns the outputs (one (b, t, d) tensor per micro-batch) and
    each hooked group's statistics."""
    hooked = {g: m for g, m in group_inputs(layer, spec).items() if g in groups}
    device = batches[0][0].device if batches else "cpu"
    with torch.no_grad(), InputStatistics(hooked, precision=precision) as stats, forward_precision(device, precision):
        outputs = [run_layer(layer, h, kw) for h, kw in batches]
    return outputs, {g: a.stats() for g, a in stats.accumulators.items()}


def collect_statistics(model: nn.Module, spec: ArchSpec, layers: list[int], ids: torch.Tensor,
                       micro_batch: int, precision: str = "float32") -> dict[int, dict[str, InputStats]]:
    """Per layer in ``layers``: its input groups' statistics from the dense model (one forward pass over token
    windows ``ids`` (N, L) at the calibration ``precision``, nothing decomposed)."""
    batches = layer_inputs(model, spec, ids, micro_batch)
    stats: dict[int, dict[str, InputStats]] = {}
    for i, layer in enumerate(decoder_layers(model, spec)):
        if i > max(layers, default=-1):
            break
        outputs, layer_stats = run_with_statistics(layer, spec, spec.groups if i in layers else {}, batches,
                                                   precision)
        if i in layers:
            stats[i] = layer_stats
        batches = [(out, kw) for out, (_, kw) in zip(outputs, batches)]
    return stats
