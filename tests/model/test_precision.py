"""Calibration at bfloat16: the Gram product's accuracy against the exact product of the same inputs, and errors."""

import pytest
import torch

from nesta_ray.model.calibration import GramAccumulator
from nesta_ray.model.precision import forward_precision, gram_product


def test_the_bfloat16_gram_is_float32_accurate_for_its_rounded_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 96, generator=g) * torch.logspace(0, -1, 96) + 0.3 * torch.randn(512, 1, generator=g)
    xb = x.bfloat16().double()
    exact = xb.T @ xb  # the product of the rounded inputs, in float64
    got = gram_product(x, "bfloat16")
    one = (x.bfloat16().T @ x.bfloat16()).double()  # one bfloat16 product, rounded to bfloat16
    rel = lambda a: float((a.double() - exact).norm() / exact.norm())  # noqa: E731
    assert got.dtype == torch.float32 and rel(got) < 1e-4 < rel(one)
    full = x.double().T @ x.double()
    assert float((got.double() - full).norm() / full.norm()) < 1e-2  # what rounding the inputs costs
    assert torch.equal(gram_product(x, "float32"), x.T @ x)


def test_an_accumulator_at_bfloat16_sums_in_float64_and_unknown_precisions_raise():
    acc = GramAccumulator(8, precision="bfloat16")
    x = torch.randn(3, 5, 8)
    acc.add(x)
    assert acc.gram_sum.dtype == torch.float64 and acc.tokens == 15
    with pytest.raises(ValueError, match="calibration precision"):
        gram_product(x.reshape(-1, 8), "float16")
    with pytest.raises(ValueError, match="calibration precision"):
        forward_precision("cpu", "int8")
    with forward_precision("cpu", "bfloat16"):
        assert (torch.randn(4, 4) @ torch.randn(4, 4)).dtype == torch.bfloat16
