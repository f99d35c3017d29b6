"""The low-rank module that replaces a compressed linear, and the surgery that puts it in (or multiplies it out)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from nesta_ray.method.decompose import Factors
from nesta_ray.model.layers import set_submodule


class LowRankLinear(nn.Module):
    """y = (x·Bᵀ)·Aᵀ + bias, a drop-in for nn.Linear(in, out) with A (out, k) and B (k, in)."""

    def __init__(
        self, in_features: int, out_features: int, rank: int, bias: bool = False,
        dtype: torch.dtype | None = None, device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Parameter(torch.empty(out_features, rank, dtype=dtype, device=device))  # (out, k)
        self.B = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))  # (k, in)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None) -> LowRankLinear:
        """Module holding copies of A (out, k), B (k, in) and an optional bias (out,)."""
        module = cls(B.shape[1], A.shape[0], A.shape[1], bias=bias is not None, dtype=A.dtype, device=A.device)
        with torch.no_grad():
            module.A.copy_(A)
            module.B.copy_(B)
            if bias is not None and module.bias is not None:
                module.bias.copy_(bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.B), self.A, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """A·B (out, in), for export to tools that know no low-rank layers."""
        return self.A @ self.B

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def install_factors(root: nn.Module, factors: Mapping[str, Factors], *, prefix: str = "",
                    device: torch.device | None = None) -> None:
    """Replace each linear named in ``factors`` (full names; ``prefix`` is stripped to find it under ``root``) by a
    LowRankLinear holding its factors in the linear's dtype, on ``device`` (default: the linear's device)."""
    for name, f in factors.items():
        path = name.removeprefix(prefix)
        old = root.get_submodule(path)
        param = next(old.parameters())
        bias = getattr(old, "bias", None)
        module = LowRankLinear.from_factors(f.A.to(param.dtype), f.B.to(param.dtype),
                                            None if bias is None else bias.detach())
        set_submodule(root, path, module.to(device if device is not None else param.device))


def dense_copy(model: nn.Module) -> nn.Module:
    """The same model with every LowRankLinear multiplied out into an nn.Linear (in place; returns the model)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankLinear):
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                              dtype=module.A.dtype)
            with torch.no_grad():
                dense.weight.copy_(module.dense_weight())
                if module.bias is not None:
                    dense.bias.copy_(module.bias)
            set_submodule(model, name, dense)
    return model
