"""Sensitivity allocation: the loss curve's identity, the budget, the dense break-even rule and optimality
against brute force on small problems."""

import itertools

import pytest
import torch

from nesta_ray.method.allocation import allocate, break_even_rank, loss_curve
from nesta_ray.method.ranks import tail_energy

F64 = torch.float64


def _convex_curve(r, seed, scale=1.0, decay=0.0):
    """A non-increasing convex D (r + 1,): tail sums of decreasing positive terms (× e^(−decay·i))."""
    g = torch.Generator().manual_seed(seed)
    terms = torch.sort(torch.rand(r, generator=g, dtype=F64), descending=True).values * scale
    terms = terms * torch.exp(-decay * torch.arange(r, dtype=F64))
    return loss_curve(terms.sqrt(), torch.ones(r, dtype=F64))


def _brute(curves, shapes, budget, lo=1):
    """The best Σ D over every choice of rank in [lo, break-even] or dense within ``budget``."""
    options = []
    for j in curves:
        m, n = shapes[j]
        opts = [(k * (m + n), float(curves[j][k])) for k in range(lo, break_even_rank(m, n) + 1)]
        options.append(opts + [(m * n, 0.0)])
    best = float("inf")
    for combo in itertools.product(*options):
        if sum(c for c, _ in combo) <= budget:
            best = min(best, sum(d for _, d in combo))
    return best


def test_loss_curve_with_unit_projections_is_the_whitened_tail_energy():
    s = torch.tensor([3.0, 2.0, 0.5, 0.1], dtype=F64)
    torch.testing.assert_close(loss_curve(s, torch.ones(4, dtype=F64)), tail_energy(s))
    p = torch.tensor([0.0, 1.0, 4.0, 2.0], dtype=F64)  # direction 0 costs the loss nothing
    torch.testing.assert_close(loss_curve(s, p), torch.tensor([4 + 1 + 0.02, 5.02, 1.02, 0.02, 0.0], dtype=F64))


def test_equal_linears_get_equal_ranks_and_the_budget_is_kept():
    shapes = {f"l{i}": (64, 48) for i in range(4)}
    curve = _convex_curve(48, seed=0, decay=0.2)  # a whitened spectrum's fast decay: dense never pays
    uniform = 13
    budget = uniform * 112 * 4
    out = allocate(dict.fromkeys(shapes, curve), shapes, budget)
    assert sorted(out.ranks.values()) == [uniform] * 4 and out.dense == ()
    assert out.params == budget


def test_a_sensitive_linear_takes_rank_from_an_insensitive_one_under_the_same_budget():
    shapes = {"q": (64, 64), "v": (64, 64)}
    curves = {"q": _convex_curve(64, seed=1, scale=0.01, decay=0.1), "v": _convex_curve(64, seed=1, decay=0.1)}
    budget = 2 * 20 * 128
    out = allocate(curves, shapes, budget, allow_dense=False)
    assert out.ranks["v"] > 20 > out.ranks["q"]
    assert budget - 128 < out.params <= budget
    assert out.predicted_loss < float(curves["q"][20] + curves["v"][20])


def test_a_linear_past_break_even_stays_dense_and_pays_m_times_n():
    shapes = {"hot": (40, 40), "cold": (40, 40)}
    curves = {"hot": _convex_curve(40, seed=2, scale=1e6), "cold": _convex_curve(40, seed=3, scale=1e-3)}
    budget = 40 * 40 + 5 * 80
    out = allocate(curves, shapes, budget)
    assert out.dense == ("hot",) and "hot" not in out.ranks
    assert out.params == 40 * 40 + out.ranks["cold"] * 80 <= budget
    no_dense = allocate(curves, shapes, budget, allow_dense=False)
    assert no_dense.dense == () and no_dense.ranks["hot"] == break_even_rank(40, 40)


@pytest.mark.parametrize("seed", range(6))
def test_convex_curves_reach_the_brute_force_optimum_for_the_parameters_spent(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (6, 4), "b": (5, 5), "c": (8, 3)}
    curves = {j: _convex_curve(min(m, n), seed=seed * 10 + i, scale=float(torch.rand(1, generator=g)) + 0.1)
              for i, (j, (m, n)) in enumerate(shapes.items())}
    for budget in range(sum(m + n for m, n in shapes.values()), 70, 3):
        out = allocate(curves, shapes, budget)
        assert out.params <= budget
        assert out.predicted_loss == pytest.approx(sum(float(curves[j][k]) for j, k in out.ranks.items()))
        assert out.predicted_loss <= _brute(curves, shapes, out.params) + 1e-12


def test_non_convex_curves_stay_within_the_budget_and_near_brute_force():
    g = torch.Generator().manual_seed(7)
    shapes = {"a": (6, 5), "b": (7, 4), "c": (5, 5)}
    curves = {j: loss_curve(torch.rand(min(m, n), generator=g, dtype=F64) + 0.1,
                            torch.rand(min(m, n), generator=g, dtype=F64)) for j, (m, n) in shapes.items()}
    for budget in range(33, 80, 4):
        out = allocate(curves, shapes, budget)
        assert out.params <= budget
        biggest_step = max(float(c[0]) for c in curves.values())
        assert out.predicted_loss <= _brute(curves, shapes, budget) + biggest_step


def test_min_ranks_and_errors():
    shapes = {"a": (10, 10), "b": (10, 10)}
    curves = {"a": _convex_curve(10, 0, 1e-6), "b": _convex_curve(10, 1, 1.0)}
    out = allocate(curves, shapes, 8 * 20, min_ranks={"a": 3, "b": 1}, allow_dense=False)
    assert out.ranks["a"] >= 3
    with pytest.raises(ValueError, match="over the budget"):
        allocate(curves, shapes, 10, min_ranks={"a": 3})
    with pytest.raises(ValueError, match="outside"):
        allocate(curves, shapes, 400, min_ranks={"a": 9})
    with pytest.raises(ValueError, match="no shape"):
        allocate(curves, {"a": (10, 10)}, 400)
    with pytest.raises(ValueError, match="negative"):
        loss_curve(torch.ones(3), torch.tensor([1.0, -1.0, 0.0]))


def test_curve_is_the_kfac_loss_of_each_whitened_truncation():
    """D(k) = tr(F·ΔW·G·ΔWᵀ) for ΔW the part of W a rank-k whitened SVD drops, with p_i = u_iᵀ·F·u_i."""
    g = torch.Generator().manual_seed(8)
    m, n = 12, 9
    W = torch.randn(m, n, generator=g, dtype=F64)
    X, Y = torch.randn(50, n, generator=g, dtype=F64), torch.randn(50, m, generator=g, dtype=F64)
    G, Fm = X.T @ X / 50, Y.T @ Y / 50  # input Gram, output-gradient covariance
    S = torch.linalg.cholesky(G)
    U, s, Vh = torch.linalg.svd(W @ S, full_matrices=False)
    curve = loss_curve(s, torch.einsum("mi,mn,ni->i", U, Fm, U))
    for k in range(n + 1):
        dW = torch.linalg.solve_triangular(S, (U[:, k:] * s[k:]) @ Vh[k:], upper=False, left=False)  # ΔW·S → ΔW
        assert float(curve[k]) == pytest.approx(float(torch.trace(Fm @ dW @ G @ dW.T)), rel=1e-9, abs=1e-12)
