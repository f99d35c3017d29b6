"""Numerical guards shared by the method's modules: finiteness checks and LAPACK failures as NumericalError."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from nesta_ray.errors import NumericalError


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise NumericalError naming ``name`` when ``t`` holds NaN or Inf."""
    if not bool(torch.isfinite(t).all()):
        raise NumericalError(f"{name} holds non-finite values (NaN or Inf); check the model weights and inputs")


def lapack(name: str, fn: Callable[[torch.Tensor], Any], M: torch.Tensor) -> Any:
    """``fn(M)`` for a LAPACK routine ``name``; its failure (e.g. no convergence) becomes a NumericalError."""
    try:
        return fn(M)
    except torch.linalg.LinAlgError as err:
        raise NumericalError(f"{name} of a {tuple(M.shape)} matrix failed ({err}); raise method.damping") from None
