"""Calibration at the device's fast precision: the Gram products from bfloat16 inputs with a float32-accurate result,
and the calibration forward under bfloat16 autocast.

Pure torch, no I/O. ``float32`` is the reference (fp32 inputs, one fp32 product). ``bfloat16`` rounds the inputs to
bfloat16 (what a bfloat16 model's activations already are) and multiplies them on the bfloat16 units: on CUDA one
tensor-core product with a float32 result; on a CPU, whose bfloat16 product rounds its result to bfloat16 too,
two products: P = bf16(xᵀx), then bf16(xᵀx − P) from the same fp32 accumulator, summed in float32, which leaves
an error of about 2⁻¹⁸ of the entries against 2⁻⁹ for P alone. The forward runs under autocast (matrix products in
bfloat16, norms and softmax in float32, the residual stream in float32); evaluation never does.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

PRECISIONS = ("float32", "bfloat16")


def gram_product(x: torch.Tensor, precision: str = "float32") -> torch.Tensor:
    """xᵀx (n, n) in float32 for inputs x (T, n) at ``precision``. Raises ValueError for an unknown precision."""
    if precision == "float32":
        x = x.to(torch.float32)
        return x.T @ x
    if precision != "bfloat16":
        raise ValueError(f"calibration precision must be one of {PRECISIONS}, got {precision!r}")
    xb = x.to(torch.bfloat16)
    if xb.device.type == "cuda":
        return torch.mm(xb.T, xb, out_dtype=torch.float32)
    P = xb.T @ xb  # rounded to bfloat16
    return P.float() + torch.addmm(P, xb.T, xb, beta=-1.0).float()  # the rounding error, itself rounded once more


def forward_precision(device: torch.device | str, precision: str = "float32") -> AbstractContextManager:
    """The context a calibration forward runs in on ``device``: bfloat16 autocast, or nothing for float32."""
    if precision == "float32":
        return nullcontext()
    if precision != "bfloat16":
        raise ValueError(f"calibration precision must be one of {PRECISIONS}, got {precision!r}")
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
