"""Calibration statistics: Gram matrices and activation abs-means of linear-layer inputs, gathered by hooks.

Pure torch, no I/O. Convention: sums are kept (fp64, from fp32 products per batch) together with the token count;
``gram()`` returns the normalised Gram G = XᵀX / T that the decomposition expects.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from nesta_ray.errors import NumericalError


class GramAccumulator:
    """Running XᵀX (n, n) and Σ|x| (n,) over every token of one layer input of width n."""

    def __init__(self, n: int, device: torch.device | str = "cpu") -> None:
        self.gram_sum = torch.zeros(n, n, dtype=torch.float64, device=device)  # (n, n)
        self.abs_sum = torch.zeros(n, dtype=torch.float64, device=device)  # (n,)
        self.tokens = 0

    @property
    def width(self) -> int:
        return self.gram_sum.shape[0]

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs x (..., n): one fp32 product xᵀx, accumulated into fp64."""
        x = x.detach().reshape(-1, self.width).to(torch.float32)  # (T, n)
        self.gram_sum.add_(x.T @ x)
        self.abs_sum.add_(x.abs().sum(dim=0))
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

    def _mean(self, total: torch.Tensor, what: str) -> torch.Tensor:
        if self.tokens == 0:
            raise NumericalError(f"no calibration token reached this layer: its {what} is empty")
        if not bool(torch.isfinite(total).all()):
            raise NumericalError(f"the {what} accumulated non-finite values; the model overflows on this input")
        return total / self.tokens


class InputStatistics:
    """Forward pre-hooks that feed one ``GramAccumulator`` per module input; use as a context manager.

    ``modules`` maps a group name (one per distinct input: q/k/v share one) to the module whose input is recorded.
    """

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules = dict(modules)
        self.accumulators: dict[str, GramAccumulator] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> InputStatistics:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0]
            acc = self.accumulators.get(name)
            if acc is None:
                acc = self.accumulators[name] = GramAccumulator(x.shape[-1], device=x.device)
            acc.add(x)

        return record
