"""LowRankLinear: the module that replaces a compressed linear, y = (x·Bᵀ)·Aᵀ + bias.

Torch only and self-contained (no nesta_ray import): the checkpoint writer copies this file verbatim into every
run beside ``modeling_nesta_lowrank.py``, so a run loads without nesta_ray. Edit it as part of the format.
"""

from __future__ import annotations

import math
from typing import TypeVar

import torch
from torch import nn
from torch.nn import functional as F


class LowRankLinear(nn.Module):
    """y = (x·Bᵀ)·Aᵀ + bias, a drop-in for nn.Linear(in, out) with A (out, k) and B (k, in).

    Both factors are kept contiguous in the layout of an nn.Linear weight, so the forward is exactly two
    ``F.linear`` calls (the second adds the bias): no copy, transpose or dtype cast per call. The input must have
    the factors' dtype and device, as for nn.Linear.
    """

    def __init__(
        self, in_features: int, out_features: int, rank: int, bias: bool = False,
        dtype: torch.dtype | None = None, device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Parameter(torch.empty(out_features, rank, dtype=dtype, device=device))  # (out, k)
        self.B = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))  # (k, in)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A random start at nn.Linear's scale (each factor as an nn.Linear of its shape would start), zero bias.
        Loading a checkpoint overwrites it; it only keeps a freshly built module finite."""
        nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None) -> LowRankLinear:
        """Module holding contiguous copies of A (out, k), B (k, in) and an optional bias (out,), in A's dtype and
        device (built on the meta device first: no random start is drawn)."""
        module = cls(B.shape[1], A.shape[0], A.shape[1], bias=bias is not None, dtype=A.dtype, device="meta")
        module.A = nn.Parameter(A.detach().clone(memory_format=torch.contiguous_format))
        module.B = nn.Parameter(B.detach().to(A.device, A.dtype).clone(memory_format=torch.contiguous_format))
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().to(A.device, A.dtype).clone(memory_format=torch.contiguous_format))
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.B), self.A, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """A·B (out, in), for export to tools that know no low-rank layers."""
        return self.A @ self.B

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


M = TypeVar("M", bound=nn.Module)


def multiply_out(model: M) -> M:
    """Replace every LowRankLinear under ``model`` by an nn.Linear holding A·B (and the bias), in the factors' dtype
    and device: the dense model again, at the dense size. In place; returns ``model``."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankLinear):
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                              dtype=module.A.dtype, device=module.A.device)
            with torch.no_grad():
                dense.weight.copy_(module.dense_weight())
                if module.bias is not None:
                    dense.bias.copy_(module.bias)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, dense)
    return model
