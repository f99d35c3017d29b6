"""Putting low-rank factors into a model: the surgery that replaces linears by LowRankLinear modules.

LowRankLinear and ``multiply_out`` (the way back to dense) live in ``lowrank_linear``, the torch-only file every
checkpoint carries."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from nesta_ray.method.decompose import Factors
from nesta_ray.model.layers import set_submodule
from nesta_ray.model.lowrank_linear import LowRankLinear


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
