"""The anchored fit's identities on random data (float64): X̂ = X is today's method, it is the exact optimum of
the anchored objective, and its reported loss is the data's."""

import pytest
import torch

from nesta_ray.method.anchored import anchored_loss, anchored_target, solve_transposed
from nesta_ray.method.decompose import InputStats, Method, decompose
from nesta_ray.method.whitening import whiten

F64 = torch.float64


def _streams(m=40, n=24, tokens=300, drift=0.3, seed=0):
    """W (m, n), dense inputs X (T, n) and 'compressed' inputs X̂ = X + a correlated error."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=F64)
    mix = torch.randn(n, n, generator=g, dtype=F64) * torch.logspace(0, -2, n, dtype=F64)
    X = torch.randn(tokens, n, generator=g, dtype=F64) @ mix
    X_hat = X @ (torch.eye(n, dtype=F64) + drift * torch.randn(n, n, generator=g, dtype=F64) / n ** 0.5) \
        + drift * 0.1 * torch.randn(tokens, n, generator=g, dtype=F64)
    return W, X, X_hat


def _stats(X, X_hat):
    T = X.shape[0]
    return InputStats(gram=X_hat.T @ X_hat / T, tokens=T, cross=X.T @ X_hat / T, dense_gram=X.T @ X / T)


def _objective(W, W_new, X, X_hat):
    """‖X·Wᵀ − X̂·W′ᵀ‖²_F / T straight from the data."""
    return float((X @ W.T - X_hat @ W_new.T).pow(2).sum()) / X.shape[0]


@pytest.mark.parametrize(("name", "tolerance"), [("asvd1", None), ("asvd2", None), ("nsvd1", 0.02), ("nsvd2", 0.05)])
def test_same_inputs_give_todays_method_to_float64_rounding(name, tolerance):
    W, X, _ = _streams()
    G = X.T @ X / X.shape[0]
    plain = decompose(W, Method(name, k1_tolerance=tolerance), 9, InputStats(gram=G), out_dtype=F64)
    anchored = decompose(W, Method(name, k1_tolerance=tolerance, anchored=True), 9,
                         InputStats(gram=G, cross=G, dense_gram=G), out_dtype=F64)
    assert (anchored.k1, anchored.k2) == (plain.k1, plain.k2)
    torch.testing.assert_close(anchored.A @ anchored.B, plain.A @ plain.B, rtol=0, atol=1e-10 * float(W.abs().max()))
    assert anchored.loss == pytest.approx(plain.loss, rel=1e-9)
    assert anchored.relative_loss == pytest.approx(plain.relative_loss, rel=1e-9)


@pytest.mark.parametrize("k", [1, 6, 15])
def test_anchored_fit_is_never_above_the_unanchored_fits_on_the_anchored_objective(k):
    W, X, X_hat = _streams(seed=1)
    stats = _stats(X, X_hat)
    anchored = decompose(W, Method("asvd1", damping=0.0, anchored=True), k, stats, out_dtype=F64)
    propagate = decompose(W, Method("asvd1", damping=0.0), k, InputStats(gram=stats.gram), out_dtype=F64)
    original = decompose(W, Method("asvd1", damping=0.0), k, InputStats(gram=stats.dense_gram), out_dtype=F64)
    mine = _objective(W, anchored.A @ anchored.B, X, X_hat)
    assert mine == pytest.approx(anchored.loss, rel=1e-8)  # the reported loss is the data's
    for other in (propagate, original):
        assert mine <= _objective(W, other.A @ other.B, X, X_hat) * (1 + 1e-12)
    assert mine < _objective(W, propagate.A @ propagate.B, X, X_hat)  # strictly: the inputs differ


def test_full_rank_anchored_fit_is_the_least_squares_regression():
    W, X, X_hat = _streams(m=30, n=20, seed=2)
    f = decompose(W, Method("asvd1", damping=0.0, anchored=True), 20, _stats(X, X_hat), out_dtype=F64)
    ols = torch.linalg.lstsq(X_hat, X @ W.T).solution.T  # (m, n): argmin ‖X·Wᵀ − X̂·W′ᵀ‖
    torch.testing.assert_close(f.A @ f.B, ols, rtol=1e-8, atol=1e-8)


def test_damping_blends_in_the_distance_to_w():
    """The damped fit is the exact optimum of ℓ(W′) + μ‖W − W′‖²: no random rank-k W′ does better."""
    W, X, X_hat = _streams(seed=3)
    stats, damping, k = _stats(X, X_hat), 1e-2, 5
    mu = damping * float(torch.diagonal(stats.gram).mean())
    f = decompose(W, Method("asvd1", damping=damping, anchored=True), k, stats, out_dtype=F64)

    def damped(W_new):
        return _objective(W, W_new, X, X_hat) + mu * float((W - W_new).pow(2).sum())

    best = damped(f.A @ f.B)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        A = f.A + 0.05 * torch.randn(f.A.shape, generator=g, dtype=F64)
        B = f.B + 0.05 * torch.randn(f.B.shape, generator=g, dtype=F64)
        assert damped(A @ B) > best


def test_nested_anchored_keeps_k1_of_the_anchored_fit_and_svd_of_the_residual():
    W, X, X_hat = _streams(seed=4)
    stats = _stats(X, X_hat)
    nested = decompose(W, Method("nsvd1", anchored=True, k1_tolerance=None), 10, stats, k1=7, out_dtype=F64)
    first = decompose(W, Method("asvd1", anchored=True), 7, stats, out_dtype=F64)
    W1 = first.A @ first.B
    U, s, Vh = torch.linalg.svd(W - W1)
    torch.testing.assert_close(nested.A @ nested.B, W1 + (U[:, :3] * s[:3]) @ Vh[:3], rtol=1e-9, atol=1e-9)
    assert nested.loss == pytest.approx(_objective(W, nested.A @ nested.B, X, X_hat), rel=1e-8)


def test_transposed_solve_matches_every_whitening_kind():
    W, X, X_hat = _streams(seed=5)
    stats = _stats(X, X_hat)
    for kind in ("cholesky", "eigen"):
        wh = whiten(stats.gram, kind, 1e-6)
        S = wh.S if kind == "cholesky" else (wh.Q * wh.root) @ wh.Q.T
        torch.testing.assert_close(solve_transposed(wh, W) @ S.T, W, rtol=1e-9, atol=1e-9)
        M = anchored_target(W, stats.gram, stats.cross, wh)
        mu = wh.damping * float(torch.diagonal(stats.gram).mean())
        torch.testing.assert_close(M @ S.T, W @ (stats.cross + mu * torch.eye(W.shape[1], dtype=F64)),
                                   rtol=1e-9, atol=1e-9)


def test_errors_name_what_is_missing():
    W, X, X_hat = _streams(seed=6)
    stats = _stats(X, X_hat)
    for name in ("svd", "asvd0"):
        with pytest.raises(ValueError, match="whitened method"):
            Method(name, anchored=True)
    with pytest.raises(ValueError, match="cross-Gram"):
        decompose(W, Method("asvd1", anchored=True), 4, InputStats(gram=stats.gram))
    with pytest.raises(ValueError, match="dense Grams"):
        decompose(W, Method("asvd1", anchored=True), 4, InputStats(gram=stats.gram, cross=stats.cross))
    with pytest.raises(ValueError, match=r"\(24, 24\) Grams"):
        anchored_target(W, stats.gram[:4, :4], stats.cross, whiten(stats.gram))
    loss, rel = anchored_loss(W, torch.zeros(40, 1, dtype=F64), torch.zeros(1, 24, dtype=F64), stats.gram,
                              stats.cross, stats.dense_gram)
    assert rel == pytest.approx(1.0)  # W′ = 0 leaves the whole dense output energy


def test_left_update_with_same_inputs_is_todays_method_and_never_above_it():
    W, X, X_hat = _streams(seed=7)
    G = X.T @ X / X.shape[0]
    plain = decompose(W, Method("nsvd1", k1_tolerance=0.02), 9, InputStats(gram=G), out_dtype=F64)
    left = decompose(W, Method("nsvd1", k1_tolerance=0.02, anchored=True, anchor="left"), 9,
                     InputStats(gram=G, cross=G, dense_gram=G), out_dtype=F64)
    torch.testing.assert_close(left.A @ left.B, plain.A @ plain.B, rtol=0, atol=1e-10 * float(W.abs().max()))
    stats = _stats(X, X_hat)
    for k in (1, 6, 15):
        mine = decompose(W, Method("asvd1", damping=0.0, anchored=True, anchor="left"), k, stats, out_dtype=F64)
        propagate = decompose(W, Method("asvd1", damping=0.0), k, InputStats(gram=stats.gram), out_dtype=F64)
        torch.testing.assert_close(mine.B, propagate.B)  # the same right factor, A refitted
        assert _objective(W, mine.A @ mine.B, X, X_hat) == pytest.approx(mine.loss, rel=1e-8)
        assert mine.loss < _objective(W, propagate.A @ propagate.B, X, X_hat)
