"""Exact identities of the decomposition methods on random matrices (float64 throughout)."""

import itertools
import math

import pytest
import torch

from nesta_ray.errors import NumericalError
from nesta_ray.method.decompose import (
    METHODS,
    InputStats,
    Method,
    Scaled,
    decompose,
    decompose_group,
    whitened_loss,
    whitened_svd,
)
from nesta_ray.method.ranks import allocate_ranks, k1_by_tolerance, rank_for_ratio, split_rank, tail_energy
from nesta_ray.method.whitening import whiten

F64 = torch.float64


def M(name, **knobs):
    """A Method with the old keyword defaults of decompose: global k1 fraction 0.95, no per-matrix tolerance."""
    return Method(name, **{"k1_tolerance": None, **knobs})


def _problem(m=48, n=32, tokens=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=F64)
    # correlated, anisotropic inputs so whitening matters
    mix = torch.randn(n, n, generator=g, dtype=F64) * torch.logspace(0, -2, n, dtype=F64)
    X = torch.randn(tokens, n, generator=g, dtype=F64) @ mix  # (T, n)
    G = X.T @ X / tokens
    return W, X, G


def _output_loss(W, A, B, X):
    """‖(W − AB)·Xᵀ‖²_F per token: the quantity the whitened loss must equal."""
    return float(((W - A @ B) @ X.T).pow(2).sum()) / X.shape[0]


@pytest.mark.parametrize("method", ["asvd1", "asvd2"])
def test_whitened_loss_is_sum_of_discarded_singular_values(method):
    W, X, G = _problem()
    k = 10
    f = decompose(W, M(method, damping=0.0), k, InputStats(gram=G), out_dtype=F64)
    S = torch.linalg.cholesky(G)
    discarded = float((torch.linalg.svdvals(W @ S)[k:] ** 2).sum())
    assert f.loss == pytest.approx(discarded, rel=1e-8)
    assert _output_loss(W, f.A, f.B, X) == pytest.approx(discarded, rel=1e-8)
    assert f.fallbacks == {"damping_escalations": 0, "eigen_fallbacks": 0, "clamped_eigenvalues": 0,
                           "gram_fallbacks": 0, "randomized_fallbacks": 0}


def test_cholesky_and_eigen_whitening_give_the_same_optimum():
    W, _, G = _problem(seed=1)
    a1 = decompose(W, M("asvd1", damping=0.0), 7, InputStats(gram=G), out_dtype=F64)
    a2 = decompose(W, M("asvd2", damping=0.0), 7, InputStats(gram=G), out_dtype=F64)
    assert a1.loss == pytest.approx(a2.loss, rel=1e-9)
    torch.testing.assert_close(a1.A @ a1.B, a2.A @ a2.B, rtol=1e-8, atol=1e-9)


def test_whitened_methods_beat_plain_svd_on_the_output_loss():
    W, X, G = _problem(seed=2)
    losses = {m: decompose(W, M(m), 8, InputStats(gram=G, abs_mean=X.abs().mean(0)),
                           out_dtype=F64).loss for m in METHODS}
    assert losses["asvd1"] < losses["svd"]
    assert losses["asvd1"] <= losses["nsvd1"] + 1e-12  # asvd is the optimum of this loss
    assert losses["nsvd1"] < losses["svd"]


@pytest.mark.parametrize("variant", ["1", "2"])
def test_nsvd_with_no_second_stage_equals_asvd(variant):
    W, _, G = _problem(seed=3)
    n = decompose(W, M("nsvd" + variant, k1_fraction=1.0), 9, InputStats(gram=G), out_dtype=F64)
    a = decompose(W, M("asvd" + variant), 9, InputStats(gram=G), out_dtype=F64)
    assert (n.k1, n.k2) == (9, 0)
    assert torch.equal(n.A, a.A) and torch.equal(n.B, a.B)


def test_nsvd_second_stage_is_svd_of_the_residual():
    W, _, G = _problem(seed=4)
    k = 20
    f = decompose(W, M("nsvd1", k1_fraction=0.75), k, InputStats(gram=G), out_dtype=F64)
    k1, k2 = split_rank(k, 0.75)
    assert (f.k1, f.k2) == (k1, k2) == (15, 5)
    stage1 = decompose(W, M("asvd1"), k1, InputStats(gram=G), out_dtype=F64)
    R = W - stage1.A @ stage1.B
    frob_residual_after = float((R - f.A[:, k1:] @ f.B[k1:]).pow(2).sum())
    assert frob_residual_after == pytest.approx(float((torch.linalg.svdvals(R)[k2:] ** 2).sum()), rel=1e-8)


@pytest.mark.parametrize("method", METHODS)
def test_shapes_parameter_count_and_hf_orientation(method):
    m, n = 24, 40  # out, in: an nn.Linear(40, 24) stores weight (24, 40)
    W, X, G = _problem(m=m, n=n, seed=5)
    lin = torch.nn.Linear(n, m, bias=False, dtype=F64)
    with torch.no_grad():
        lin.weight.copy_(W)
    k = rank_for_ratio(m, n, 0.25)
    f = decompose(lin.weight, M(method), k, InputStats(gram=G, abs_mean=X.abs().mean(0)), out_dtype=F64)
    assert f.A.shape == (m, k) and f.B.shape == (k, n)
    assert f.A.numel() + f.B.numel() == k * (m + n) <= 0.75 * m * n
    x = X[:5]
    with torch.no_grad():
        y_dense = lin(x)
    y_factored = (x @ f.B.T) @ f.A.T  # y = x Bᵀ Aᵀ: the factors act like the transposed HF weight
    if method in ("asvd1", "asvd2"):  # the optimum: output error over all tokens = the discarded whitened energy
        wh_sv = torch.linalg.svdvals(W @ torch.linalg.cholesky(G))
        assert float(((W - f.A @ f.B) @ X.T).pow(2).sum()) / X.shape[0] == pytest.approx(
            float((wh_sv[k:] ** 2).sum()), rel=1e-6)
    assert float((y_dense - y_factored).pow(2).sum()) < float(y_dense.pow(2).sum())


def test_rank_for_ratio_formula_and_errors():
    assert rank_for_ratio(576, 576, 0.1) == 259  # the example: 10% of a 576x576 keeps rank 259
    assert rank_for_ratio(576, 1536, 0.2) == math.floor(0.8 * 576 * 1536 / 2112)
    with pytest.raises(ValueError):
        rank_for_ratio(8, 8, 1.0)
    with pytest.raises(ValueError):
        rank_for_ratio(2, 2, 0.9)


def test_rank_deficient_gram_gives_finite_factors_and_counts_fallbacks():
    W, _, _ = _problem(m=30, n=64, seed=6)
    X = torch.randn(16, 64, dtype=F64)  # fewer tokens than dimensions
    X[:, 5] = 0.0  # and a dead channel
    G = X.T @ X / 16
    for method in METHODS:
        f = decompose(W, M(method, damping=0.0), 12, InputStats(gram=G, abs_mean=X.abs().mean(0)))
        assert torch.isfinite(f.A).all() and torch.isfinite(f.B).all(), method
        if method in ("asvd1", "nsvd1"):
            assert f.fallbacks["damping_escalations"] >= 1
        if method == "asvd0":
            assert f.fallbacks["clamped_eigenvalues"] == 1  # the dead channel's zero scale


def test_non_pd_gram_escalates_then_falls_back_to_eigen():
    G = -torch.eye(6, dtype=F64)
    G[0, 0] = 20.0  # positive mean diagonal, but indefinite beyond the largest damping level
    wh = whiten(G, "cholesky", damping=0.0)
    assert wh.eigen_fallback and wh.kind == "eigen" and wh.escalations > 0 and wh.clamped == 5
    W = torch.randn(4, 6, dtype=F64)
    f = decompose(W, M("asvd1", damping=0.0), 2, InputStats(gram=G))
    assert f.fallbacks["eigen_fallbacks"] == 1 and torch.isfinite(f.A).all()


def test_non_finite_inputs_raise():
    W, _, G = _problem(seed=7)
    bad = G.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="Gram"):
        decompose(W, M("asvd1"), 4, InputStats(gram=bad))
    W2 = W.clone()
    W2[1, 1] = float("inf")
    with pytest.raises(NumericalError, match="weight"):
        decompose(W2, M("svd"), 4)
    with pytest.raises(NumericalError, match="no non-zero input"):
        decompose(W, M("asvd1"), 4, InputStats(gram=torch.zeros_like(G)))


def test_group_shares_one_whitening_and_matches_single_calls(monkeypatch):
    import nesta_ray.method.decompose as dec

    W, _, G = _problem(seed=8)
    calls = []
    real = dec.whiten
    monkeypatch.setattr(dec, "whiten", lambda *a, **k: calls.append(1) or real(*a, **k))
    Wk = torch.randn(16, W.shape[1], dtype=F64)
    group = dec.decompose_group({"q": W, "k": Wk}, {"q": 6, "k": 4}, M("nsvd2"), InputStats(gram=G), out_dtype=F64)
    assert len(calls) == 1  # one whitening for the whole group
    single = decompose(Wk, M("nsvd2"), 4, InputStats(gram=G), out_dtype=F64)
    torch.testing.assert_close(group["k"].A, single.A)
    assert group["q"].rank == 6 and group["k"].rank == 4


def test_whitened_loss_without_gram_is_frobenius():
    W = torch.randn(5, 7, dtype=F64)
    f = decompose(W, M("svd"), 3, out_dtype=F64)
    loss, rel = whitened_loss(W, f.A, f.B, None)
    sv = torch.linalg.svdvals(W)
    assert loss == pytest.approx(float((sv[3:] ** 2).sum()), rel=1e-10)
    assert rel == pytest.approx(loss / float((sv**2).sum()))


def test_damping_is_relative_to_the_gram_scale():
    W, _, G = _problem(seed=9)
    X = torch.randn(10, G.shape[0], dtype=F64)
    G = X.T @ X / 10  # rank-deficient, so damping is what makes it factorable
    small = decompose(W, M("nsvd1", damping=1e-4), 6, InputStats(gram=G), out_dtype=F64)
    big = decompose(W, M("nsvd1", damping=1e-4), 6, InputStats(gram=G * 1e6), out_dtype=F64)
    torch.testing.assert_close(small.A @ small.B, big.A @ big.B, rtol=1e-7, atol=1e-9)
    assert small.fallbacks == big.fallbacks
    assert big.loss == pytest.approx(small.loss * 1e6, rel=1e-7)


def test_tail_energy_is_the_whitened_loss_of_each_rank():
    s = torch.tensor([3.0, 2.0, 1.0], dtype=F64)
    assert tail_energy(s).tolist() == [14.0, 5.0, 1.0, 0.0]


def test_k1_by_tolerance_edges_and_bound():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0, 1.0, 0.5], dtype=F64)  # E = [31.25, 15.25, 6.25, 2.25, 1.25, 0.25, 0]
    assert k1_by_tolerance(s, 4, 0.0) == 4  # no tolerance: the plain whitened SVD
    assert k1_by_tolerance(s, 4, 0.8) == 3  # E[3] = 2.25 <= 1.8 * 1.25
    assert k1_by_tolerance(s, 4, 4.0) == 2  # E[2] = 6.25 <= 5 * 1.25 exactly
    assert k1_by_tolerance(s, 4, 1e9) == 0
    assert k1_by_tolerance(s, 4, 1e9, min_k1=3) == 3  # the guard
    assert k1_by_tolerance(s, 0, 0.0) == 0
    exact = torch.tensor([2.0, 1.0, 0.0, 0.0], dtype=F64)  # rank 2: the optimum at k = 3 is already 0
    assert k1_by_tolerance(exact, 3, 0.0) == 2
    for bad in [dict(k=7, tol=0.1), dict(k=3, tol=-0.1), dict(k=2, tol=0.1, min_k1=3)]:
        with pytest.raises(ValueError, match="k1_by_tolerance"):
            k1_by_tolerance(s, **bad)


def test_nested_loss_with_tolerance_rule_is_within_the_tolerance():
    W, _, G = _problem(m=40, n=56, seed=10)
    wh = whiten(G, "cholesky", damping=0.0)
    usv = whitened_svd(W, wh)
    k, tol = 12, 0.3
    k1 = k1_by_tolerance(usv[1], k, tol)
    assert 0 < k1 < k
    f = decompose(W, M("nsvd1", damping=0.0), k, InputStats(gram=G), scaled=Scaled(wh, usv), k1=k1, out_dtype=F64)
    optimum = float(tail_energy(usv[1])[k])
    assert (f.k1, f.k2) == (k1, k - k1)
    assert optimum <= f.loss <= (1 + tol) * optimum
    fresh = decompose(W, M("nsvd1", damping=0.0, k1_tolerance=tol), k, InputStats(gram=G),
                      out_dtype=F64)  # rule inside, no cached SVD
    assert fresh.k1 == k1
    torch.testing.assert_close(f.A @ f.B, fresh.A @ fresh.B, rtol=1e-9, atol=1e-10)
    group = decompose_group({"w": W}, {"w": k}, M("nsvd1", damping=0.0, k1_tolerance=tol), InputStats(gram=G),
                            out_dtype=F64)
    assert group["w"].k1 == k1
    with pytest.raises(ValueError, match="not both"):
        decompose(W, M("nsvd1", k1_tolerance=tol), k, InputStats(gram=G), k1=k1)


def test_explicit_k1_and_usv_are_validated():
    W, _, G = _problem(seed=11)
    with pytest.raises(ValueError, match="k1"):
        decompose(W, M("asvd1"), 5, InputStats(gram=G), k1=3)
    with pytest.raises(ValueError, match="k1"):
        decompose(W, M("nsvd1"), 5, InputStats(gram=G), k1=6)
    wh = whiten(G)
    with pytest.raises(ValueError, match="whitening"):
        decompose(W, M("asvd1"), 5, InputStats(gram=G), scaled=Scaled(None, whitened_svd(W, wh)))


def _brute_force(spectra, costs, budget, lo, hi):
    names = list(spectra)
    best = None
    for ranks in itertools.product(*[range(lo[j], hi[j] + 1) for j in names]):
        if sum(r * costs[j] for r, j in zip(ranks, names)) <= budget:
            kept = sum(float((spectra[j][:r] ** 2).sum()) for r, j in zip(ranks, names))
            best = kept if best is None else max(best, kept)
    return best


def _kept(spectra, ranks):
    return sum(float((spectra[j][: ranks[j]] ** 2).sum()) for j in spectra)


def test_allocate_ranks_equal_costs_is_exact_for_every_budget():
    g = torch.Generator().manual_seed(12)
    spectra = {j: torch.sort(torch.rand(5, generator=g, dtype=F64) * 3, descending=True).values for j in "abc"}
    costs = {j: 4 for j in spectra}
    lo, hi = {j: 0 for j in spectra}, {j: 5 for j in spectra}
    for budget in range(0, 61):
        ranks = allocate_ranks(spectra, costs, budget, normalise=False, min_ranks=lo)
        assert sum(ranks[j] * costs[j] for j in spectra) <= budget
        assert _kept(spectra, ranks) == pytest.approx(_brute_force(spectra, costs, budget, lo, hi), rel=1e-12)


def test_allocate_ranks_unequal_costs_respects_budget_guards_and_is_near_brute_force():
    g = torch.Generator().manual_seed(13)
    spectra = {j: torch.sort(torch.rand(6, generator=g, dtype=F64) * (i + 1), descending=True).values
               for i, j in enumerate("abc")}
    costs = {"a": 3, "b": 5, "c": 8}
    lo, hi = {"a": 1, "b": 0, "c": 1}, {"a": 5, "b": 6, "c": 4}
    top_gain = max(float(s[0] ** 2) for s in spectra.values())
    exact_hits = 0
    for budget in range(11, 80):
        ranks = allocate_ranks(spectra, costs, budget, normalise=False, min_ranks=lo, max_ranks=hi)
        assert sum(ranks[j] * costs[j] for j in spectra) <= budget
        assert all(lo[j] <= ranks[j] <= hi[j] for j in spectra)
        best = _brute_force(spectra, costs, budget, lo, hi)
        kept = _kept(spectra, ranks)
        assert best - top_gain <= kept <= best + 1e-12
        exact_hits += kept == pytest.approx(best, rel=1e-12)
    assert exact_hits >= 40  # the Lagrangian solution is usually the exact optimum


def test_allocate_ranks_normalises_per_matrix_and_spends_the_budget():
    s = torch.tensor([2.0, 1.0, 1.0, 0.5], dtype=F64)
    spectra = {"small": s, "big": s * 100.0}  # same shape of spectrum, 10⁴ times the energy
    costs = {"small": 10, "big": 10}
    assert allocate_ranks(spectra, costs, 60, normalise=True) == {"small": 3, "big": 3}
    raw = allocate_ranks(spectra, costs, 60, normalise=False)
    assert raw == {"small": 2, "big": 4}
    assert allocate_ranks(spectra, costs, 79) == {"small": 4, "big": 3}  # ties go to the first-named matrix


def test_allocate_ranks_errors():
    s = {"a": torch.ones(3, dtype=F64)}
    with pytest.raises(ValueError, match="over the budget"):
        allocate_ranks(s, {"a": 10}, 5)
    with pytest.raises(ValueError, match="cost"):
        allocate_ranks(s, {}, 50)
    with pytest.raises(ValueError, match="max rank"):
        allocate_ranks(s, {"a": 1}, 50, max_ranks={"a": 4})
