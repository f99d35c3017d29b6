"""The factorisations of a scaled weight against LAPACK's full SVD, the randomized residual's acceptance and its
counted fallback, the solver's precision and labels, and the work model the plan uses."""

import pytest
import torch

from nesta_ray.errors import NumericalError
from nesta_ray.method.decompose import InputStats, Method, Scaled, decompose, decompose_group, scale
from nesta_ray.method.factorize import (
    Solver,
    flops,
    full_svd,
    gram_svd,
    randomized_svd,
    residual_factors,
    ritz_accepted,
    spectrum,
    truncate,
)
from nesta_ray.method.whitening import diagonal_scaling, whiten

F64 = torch.float64
EXACT = Solver(first="svd", residual="svd")


def _problem(m, n, tokens=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=F64) * torch.logspace(0, -1, n, dtype=F64)
    mix = torch.randn(n, n, generator=g, dtype=F64) * torch.logspace(0, -2, n, dtype=F64)
    X = torch.randn(tokens, n, generator=g, dtype=F64) @ mix
    return W, X.T @ X / tokens


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
@pytest.mark.parametrize("kind", ["cholesky", "eigen", "diagonal", None])
def test_the_short_side_gram_gives_the_svd_factor_product(shape, kind):
    W, G = _problem(*shape)
    wh = None if kind is None else (diagonal_scaling(torch.rand(shape[1], dtype=F64) + 0.1) if kind == "diagonal"
                                    else whiten(G, kind))
    X = wh.apply(W) if wh is not None else W
    ref, got = full_svd(X), gram_svd(X)
    # squaring costs the small σ their relative accuracy: absolute errors stay below √eps·σ₁
    torch.testing.assert_close(got[1], ref[1], rtol=1e-9, atol=1e-7 * float(ref[1][0]))
    assert (got[0] is None) == (shape[0] > shape[1]) and (got[2] is None) == (shape[0] <= shape[1])
    funcs = (wh.right_solve, wh.times) if wh is not None else (None, None)
    for k in (1, 7, min(shape)):
        A, B = truncate(ref, k, W, *funcs)
        A2, B2 = truncate(got, k, W, *funcs)
        torch.testing.assert_close(A2 @ B2, A @ B, rtol=1e-8, atol=1e-10)
        for dim, (a, b) in ((0, (A, A2)), (1, (B, B2))):  # the same balance as the SVD's: ‖A_i‖ = √σ_i
            torch.testing.assert_close(torch.linalg.vector_norm(b, dim=dim), torch.linalg.vector_norm(a, dim=dim),
                                       rtol=1e-5, atol=1e-10)


def test_whitening_times_is_s_times_m():
    _, G = _problem(20, 16)
    M = torch.randn(16, 5, dtype=F64)
    for wh in (whiten(G, "cholesky"), whiten(G, "eigen"), diagonal_scaling(torch.rand(16, dtype=F64) + 0.1)):
        S = wh.apply(torch.eye(16, dtype=F64))  # I·S
        torch.testing.assert_close(wh.times(M), S @ M, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["asvd1", "nsvd1", "nsvd2", "svd", "asvd0"])
def test_the_default_solver_matches_full_svds_in_loss(name):
    W, G = _problem(48, 32, seed=1)
    stats = InputStats(G, torch.rand(32, dtype=F64) + 0.1, 600)
    method = Method(name, k1_tolerance=None, k1_fraction=0.7)
    ref = decompose(W, method, 12, stats, out_dtype=F64, solver=EXACT)
    got = decompose(W, method, 12, stats, out_dtype=F64)
    assert (got.k1, got.k2) == (ref.k1, ref.k2)
    assert got.loss == pytest.approx(ref.loss, rel=1e-9)
    torch.testing.assert_close(got.A @ got.B, ref.A @ ref.B, rtol=1e-7, atol=1e-9)
    assert got.solver == ("cpu float64 gram+gram" if method.nested else "cpu float64 gram")


def _gapped(m, n, k, seed=0):
    """A matrix with k dominant singular values (100x above a flat tail)."""
    g = torch.Generator().manual_seed(seed)
    Q1 = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=F64)).Q
    Q2 = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64)).Q
    s = torch.cat([torch.linspace(200, 100, k, dtype=F64), torch.ones(min(m, n) - k, dtype=F64)])
    return (Q1[:, : s.numel()] * s) @ Q2[:, : s.numel()].T


def test_the_randomized_residual_is_accepted_on_a_gap_and_exact_to_its_tolerance():
    R = _gapped(120, 90, 3)
    solver = Solver(residual="randomized")
    A2, B2, fb = residual_factors(R, 3, solver)
    assert fb == {"randomized_fallbacks": 0}
    U, s, Vh = full_svd(R)
    torch.testing.assert_close(A2 @ B2, (U[:, :3] * s[:3]) @ Vh[:3], rtol=1e-6, atol=1e-6)
    again = residual_factors(R, 3, solver)
    assert torch.equal(again[0], A2) and torch.equal(again[1], B2)  # seeded: every path gets the same factors


def test_an_unconverged_sketch_falls_back_to_the_exact_gram_and_counts_it():
    R = torch.randn(120, 90, generator=torch.Generator().manual_seed(3), dtype=F64)  # a flat spectrum
    solver = Solver(residual="randomized", power_iters=0, oversample=0, tol=1e-6)
    assert not ritz_accepted(R, randomized_svd(R, 4, 0, 0), 1e-6)
    A2, B2, fb = residual_factors(R, 4, solver)
    assert fb == {"randomized_fallbacks": 1, "gram_fallbacks": 0}
    exact = residual_factors(R, 4, Solver(residual="gram"))
    assert torch.equal(A2, exact[0]) and torch.equal(B2, exact[1])


def test_a_failed_eigh_falls_back_to_the_full_svd_and_counts_it(monkeypatch):
    W, _ = _problem(20, 30)

    def fails(M):  # LAPACK's failure to converge, as torch raises it
        raise torch.linalg.LinAlgError("eigh: the algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", fails)
    usv, fb = spectrum(W, "gram")
    assert fb == {"gram_fallbacks": 1} and usv[0] is not None and usv[2] is not None
    with pytest.raises(NumericalError, match="eigh"):
        gram_svd(W)


def test_auto_picks_the_benchmarks_methods_and_an_explicit_choice_wins():
    solver = Solver()
    assert solver.first_for(576, 1536) == solver.residual_for(576, 1536, 5) == "gram"
    assert Solver(first="svd").first_for(576, 1536) == "svd"
    assert Solver(residual="randomized").residual_for(576, 1536, 5) == "randomized"
    assert Solver(residual="randomized").label(576, 1536, 5) == "cpu float64 gram+randomized"
    with pytest.raises(ValueError, match="solver"):
        Solver(dtype="float16")


def test_float32_solver_stays_within_a_small_loss_of_float64_and_returns_host_factors():
    W, G = _problem(64, 48, seed=4)
    method = Method("nsvd1", k1_tolerance=0.02)
    f64 = decompose(W, method, 16, InputStats(G, None, 600))
    f32 = decompose(W, method, 16, InputStats(G, None, 600), solver=Solver(dtype="float32"))
    assert f32.A.device.type == "cpu" and f32.A.dtype == torch.float32
    assert f32.loss == pytest.approx(f64.loss, rel=1e-3)
    assert f32.solver.startswith("cpu float32")


def test_a_group_shares_one_scaling_and_a_scaled_factorisation_moves_between_devices():
    W, G = _problem(40, 32, seed=5)
    W2 = torch.randn(24, 32, generator=torch.Generator().manual_seed(6), dtype=F64)
    method, stats = Method("nsvd1"), InputStats(G, None, 600)
    group = decompose_group({"a": W, "b": W2}, {"a": 9, "b": 6}, method, stats)
    single = decompose(W2, method, 6, stats)
    assert torch.equal(group["b"].A, single.A) and torch.equal(group["b"].B, single.B)
    scaled = scale(W, method, stats)
    moved = scaled.to("cpu")
    assert isinstance(moved, Scaled) and torch.equal(moved.usv[1], scaled.usv[1])
    assert torch.equal(decompose(W, method, 9, stats, scaled=moved).A, group["a"].A)


def test_the_work_model_counts_the_short_side_and_the_residual():
    svd = flops(8192, 28672, 5097, 25, Solver(first="svd", residual="svd"))
    auto = flops(8192, 28672, 5097, 25, Solver())
    sketch = flops(8192, 28672, 5097, 25, Solver(residual="randomized"))
    assert auto["svd"] == 0 and auto["eigh"] == 2 * 9.0 * 8192**3 and auto["qr"] == 0
    assert sketch["eigh"] == 9.0 * 8192**3 and sketch["qr"] > 0 and sum(sketch.values()) < sum(auto.values())
    assert svd["svd"] == 2 * (4.0 * 28672 * 8192**2 + 22.0 * 8192**3)
    assert auto["cholesky"] == svd["cholesky"] == 28672**3 / 3
    assert sum(auto.values()) < sum(svd.values())
