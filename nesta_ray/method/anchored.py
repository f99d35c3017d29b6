"""The anchored, error-compensating fit of one linear: reduced-rank regression of the dense model's outputs on
the inputs the compressed model actually produces.

Pure torch, float64, no explicit inverse. Conventions as in ``decompose`` (W is (m, n) = (out, in), tokens are
rows): X (T, n) are the linear's inputs in the dense model, X̂ (T, n) its inputs once the earlier layers are
compressed. The statistics are normalised by T: Ĝ = X̂ᵀX̂/T, the cross-Gram C = XᵀX̂/T and the dense Gram
G = XᵀX/T. The anchored objective of a replacement W′ is the mean squared distance to the dense outputs,

    ℓ(W′) = ‖X·Wᵀ − X̂·W′ᵀ‖²_F / T = tr(W·G·Wᵀ) − 2·tr(W·C·W′ᵀ) + tr(W′·Ĝ·W′ᵀ).

With the damped Gram Ĝ + μ·I = S·Sᵀ (μ = λ·mean diag Ĝ, the whitening's relative damping) and
M = W·(C + μ·I)·S⁻ᵀ, completing the square gives ℓ(W′) + μ·‖W − W′‖²_F = ‖W′·S − M‖²_F + const, so the rank-k
optimum of the damped objective is W′ = [M]_k·S⁻¹: the truncated SVD of M mapped back by a triangular solve
(SVD-LLM's own closed-form update and AA-SVD are variants of this reduced-rank regression). Damping blends in
the plain Frobenius distance to W, exactly as it does for the whitened SVD. With X̂ = X (C = Ĝ = G) M is W·S
and the fit is today's whitened SVD.
"""

from __future__ import annotations

import torch

from nesta_ray.errors import NumericalError
from nesta_ray.method.guards import check_finite
from nesta_ray.method.whitening import Whitening


def solve_transposed(wh: Whitening, M: torch.Tensor) -> torch.Tensor:
    """M·S⁻ᵀ for M (m, n) and the whitening factor S (n, n): a triangular solve against Sᵀ for a Cholesky S; the
    eigen and diagonal roots are symmetric, so S⁻ᵀ = S⁻¹ there. Never an explicit inverse."""
    if wh.kind == "cholesky":
        assert wh.S is not None
        return torch.linalg.solve_triangular(wh.S.T, M, upper=True, left=False)
    return wh.right_solve(M)


def anchored_target(W: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, wh: Whitening) -> torch.Tensor:
    """M = W·(C + μ·I)·S⁻ᵀ (m, n) in float64 for W (m, n), the compressed-stream Gram Ĝ (n, n) that ``wh``
    whitens, and the cross-Gram C = XᵀX̂/T (n, n); μ = wh.damping·mean diag Ĝ. Its truncated SVD at rank k,
    mapped back by S⁻¹, is the anchored optimum (module docstring). Raises NumericalError for non-finite input
    or output, ValueError for mismatched shapes."""
    m, n = W.shape
    if gram.shape != (n, n) or cross.shape != (n, n):
        raise ValueError(f"the anchored fit of a {m}x{n} weight needs ({n}, {n}) Grams, got {tuple(gram.shape)} "
                         f"and {tuple(cross.shape)}")
    check_finite("weight", W)
    check_finite("cross-Gram", cross)
    W64 = W.detach().to(torch.float64)
    mu = wh.damping * float(torch.diagonal(gram.to(torch.float64)).mean())
    WC = W64 @ cross.to(torch.float64) + mu * W64  # (m, n) = W·(C + μ·I)
    M = solve_transposed(wh, WC)  # (m, n)
    if not bool(torch.isfinite(M).all()):
        raise NumericalError("the anchored fit's target W·C·S⁻ᵀ is not finite")
    return M


def anchored_loss(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor,
                  dense_gram: torch.Tensor) -> tuple[float, float]:
    """(ℓ(A·B), ℓ(A·B) / tr(W·G·Wᵀ)) of the undamped anchored objective (module docstring) for W (m, n),
    A (m, k), B (k, n) and the statistics Ĝ, C, G (n, n), all in float64. The relative loss is the layer's
    output error against the dense model's output energy, including the error its inputs inherited from the
    layers compressed before it (the part no rank can remove)."""
    W64, A64, B64 = W.to(torch.float64), A.to(torch.float64), B.to(torch.float64)
    G, C, Gh = dense_gram.to(torch.float64), cross.to(torch.float64), gram.to(torch.float64)
    ref = float(((W64 @ G) * W64).sum())  # tr(W·G·Wᵀ)
    cross_term = float((((W64 @ C) @ B64.T) * A64).sum())  # tr(W·C·(A·B)ᵀ)
    own = float(((A64 @ (B64 @ Gh @ B64.T)) * A64).sum())  # tr(A·B·Ĝ·Bᵀ·Aᵀ)
    loss = ref - 2.0 * cross_term + own  # ≥ 0 for statistics of real inputs, up to rounding
    return loss, (loss / ref if ref > 0 else 0.0)


def anchored_left(W: torch.Tensor, B: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor,
                  mu: float) -> torch.Tensor:
    """The left factor A (m, k) that minimises the damped anchored objective ℓ(A·B) + μ·‖W − A·B‖²_F for a fixed
    right factor B (k, n): A·(B·(Ĝ + μI)·Bᵀ) = W·(C + μI)·Bᵀ, solved by a Cholesky factorisation of the (k, k)
    matrix (a k-dimensional regression; the full reduced-rank regression regresses on all n input directions).
    With X̂ = X and B from the whitened SVD this is that SVD's own A. Raises NumericalError when B·Ĝ·Bᵀ is not
    positive definite."""
    W64, B64 = W.to(torch.float64), B.to(torch.float64)
    rhs = W64 @ (cross.to(torch.float64) @ B64.T) + mu * (W64 @ B64.T)  # (m, k)
    lhs = B64 @ gram.to(torch.float64) @ B64.T + mu * (B64 @ B64.T)  # (k, k) = B·(Ĝ + μI)·Bᵀ
    L, info = torch.linalg.cholesky_ex((lhs + lhs.T) / 2)
    if int(info) != 0:
        raise NumericalError("the anchored update's B·Ĝ·Bᵀ is not positive definite")
    return torch.cholesky_solve(rhs.T, L).T  # (m, k) = rhs·lhs⁻¹ by two triangular solves
