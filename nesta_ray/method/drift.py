"""Activation drift: how much worse the published factors serve tonight's inputs than the inputs they were fitted to.

For a linear W (m, n) replaced by A·B, its relative output error under a Gram G (n, n) is
e(G) = tr(Δ·G·Δᵀ) / tr(W·G·Wᵀ) with Δ = W − A·B. The checkpoint records e at compression time (``relative_loss``
in nesta.json, under the calibration Gram). Tonight's Gram gives e_now. A linear's drift ratio is e_now / e_then;
a layer's drift score is the geometric mean of its linears' ratios minus one (0: the factors serve tonight's traffic
exactly as well as the calibration traffic; 1: twice the error). Pure torch, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from nesta_ray.errors import NumericalError
from nesta_ray.method.decompose import whitened_loss


def relative_error(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, G: torch.Tensor) -> float:
    """tr(Δ·G·Δᵀ) / tr(W·G·Wᵀ) for W (m, n), A (m, k), B (k, n), G (n, n), in float64."""
    return whitened_loss(W, A, B, G)[1]


def layer_scores(then: Mapping[str, float], now: Mapping[str, float], layer_of: Mapping[str, int]) -> dict[int, float]:
    """Drift score per layer: geometric mean over the layer's linears of now/then, minus one.

    ``then``/``now`` map linear name -> relative error; every name in ``now`` must be in ``then`` and ``layer_of``.
    Raises NumericalError for a non-finite or negative error, or a zero ``then`` with a non-zero ``now``.
    """
    logs: dict[int, list[float]] = {}
    for name, e_now in now.items():
        e_then = then[name]
        if not (math.isfinite(e_now) and math.isfinite(e_then)) or e_now < 0 or e_then < 0:
            raise NumericalError(f"{name}: relative errors must be finite and >= 0, got then={e_then}, now={e_now}")
        if e_then == 0.0:
            if e_now != 0.0:
                raise NumericalError(f"{name}: exact at compression time but not now ({e_now}); the ratio is unbounded")
            ratio = 1.0
        else:
            ratio = e_now / e_then
        logs.setdefault(layer_of[name], []).append(math.log(ratio) if ratio > 0 else -math.inf)
    return {layer: math.exp(sum(v) / len(v)) - 1.0 for layer, v in sorted(logs.items())}
