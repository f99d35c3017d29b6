"""Exact identities of the decomposition methods on random matrices (float64 throughout)."""

import math

import pytest
import torch

from nesta_ray.decompose import (
    METHODS,
    decompose,
    rank_for_ratio,
    split_rank,
    whiten,
    whitened_loss,
)
from nesta_ray.errors import NumericalError

F64 = torch.float64


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
    f = decompose(W, method, k, gram=G, damping=0.0, out_dtype=F64)
    S = torch.linalg.cholesky(G)
    discarded = float((torch.linalg.svdvals(W @ S)[k:] ** 2).sum())
    assert f.loss == pytest.approx(discarded, rel=1e-8)
    assert _output_loss(W, f.A, f.B, X) == pytest.approx(discarded, rel=1e-8)
    assert f.fallbacks == {"damping_escalations": 0, "eigen_fallbacks": 0, "clamped_eigenvalues": 0}


def test_cholesky_and_eigen_whitening_give_the_same_optimum():
    W, _, G = _problem(seed=1)
    a1 = decompose(W, "asvd1", 7, gram=G, damping=0.0, out_dtype=F64)
    a2 = decompose(W, "asvd2", 7, gram=G, damping=0.0, out_dtype=F64)
    assert a1.loss == pytest.approx(a2.loss, rel=1e-9)
    torch.testing.assert_close(a1.A @ a1.B, a2.A @ a2.B, rtol=1e-8, atol=1e-9)


def test_whitened_methods_beat_plain_svd_on_the_output_loss():
    W, X, G = _problem(seed=2)
    losses = {m: decompose(W, m, 8, gram=G, abs_mean=X.abs().mean(0), out_dtype=F64).loss for m in METHODS}
    assert losses["asvd1"] < losses["svd"]
    assert losses["asvd1"] <= losses["nsvd1"] + 1e-12  # asvd is the optimum of this loss
    assert losses["nsvd1"] < losses["svd"]


@pytest.mark.parametrize("variant", ["1", "2"])
def test_nsvd_with_no_second_stage_equals_asvd(variant):
    W, _, G = _problem(seed=3)
    n = decompose(W, "nsvd" + variant, 9, gram=G, k1_fraction=1.0, out_dtype=F64)
    a = decompose(W, "asvd" + variant, 9, gram=G, out_dtype=F64)
    assert (n.k1, n.k2) == (9, 0)
    assert torch.equal(n.A, a.A) and torch.equal(n.B, a.B)


def test_nsvd_second_stage_is_svd_of_the_residual():
    W, _, G = _problem(seed=4)
    k = 20
    f = decompose(W, "nsvd1", k, gram=G, k1_fraction=0.75, out_dtype=F64)
    k1, k2 = split_rank(k, 0.75)
    assert (f.k1, f.k2) == (k1, k2) == (15, 5)
    stage1 = decompose(W, "asvd1", k1, gram=G, out_dtype=F64)
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
    f = decompose(lin.weight, method, k, gram=G, abs_mean=X.abs().mean(0), out_dtype=F64)
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
        f = decompose(W, method, 12, gram=G, abs_mean=X.abs().mean(0), damping=0.0)
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
    f = decompose(W, "asvd1", 2, gram=G, damping=0.0)
    assert f.fallbacks["eigen_fallbacks"] == 1 and torch.isfinite(f.A).all()


def test_non_finite_inputs_raise():
    W, _, G = _problem(seed=7)
    bad = G.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="Gram"):
        decompose(W, "asvd1", 4, gram=bad)
    W2 = W.clone()
    W2[1, 1] = float("inf")
    with pytest.raises(NumericalError, match="weight"):
        decompose(W2, "svd", 4)
    with pytest.raises(NumericalError, match="no non-zero input"):
        decompose(W, "asvd1", 4, gram=torch.zeros_like(G))


def test_group_shares_one_whitening_and_matches_single_calls(monkeypatch):
    import nesta_ray.decompose as dec

    W, _, G = _problem(seed=8)
    calls = []
    real = dec.whiten
    monkeypatch.setattr(dec, "whiten", lambda *a, **k: calls.append(1) or real(*a, **k))
    Wk = torch.randn(16, W.shape[1], dtype=F64)
    group = dec.decompose_group({"q": W, "k": Wk}, {"q": 6, "k": 4}, "nsvd2", gram=G, out_dtype=F64)
    assert len(calls) == 1  # one whitening for the whole group
    single = decompose(Wk, "nsvd2", 4, gram=G, out_dtype=F64)
    torch.testing.assert_close(group["k"].A, single.A)
    assert group["q"].rank == 6 and group["k"].rank == 4


def test_whitened_loss_without_gram_is_frobenius():
    W = torch.randn(5, 7, dtype=F64)
    f = decompose(W, "svd", 3, out_dtype=F64)
    loss, rel = whitened_loss(W, f.A, f.B, None)
    sv = torch.linalg.svdvals(W)
    assert loss == pytest.approx(float((sv[3:] ** 2).sum()), rel=1e-10)
    assert rel == pytest.approx(loss / float((sv**2).sum()))


def test_damping_is_relative_to_the_gram_scale():
    W, _, G = _problem(seed=9)
    X = torch.randn(10, G.shape[0], dtype=F64)
    G = X.T @ X / 10  # rank-deficient, so damping is what makes it factorable
    small = decompose(W, "nsvd1", 6, gram=G, damping=1e-4, out_dtype=F64)
    big = decompose(W, "nsvd1", 6, gram=G * 1e6, damping=1e-4, out_dtype=F64)
    torch.testing.assert_close(small.A @ small.B, big.A @ big.B, rtol=1e-7, atol=1e-9)
    assert small.fallbacks == big.fallbacks
    assert big.loss == pytest.approx(small.loss * 1e6, rel=1e-7)
