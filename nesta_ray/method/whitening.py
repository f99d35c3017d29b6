"""Input scalings of a linear: the whitening S of its Gram (S·Sᵀ = G, damped) and ASVD's diagonal scaling.

Pure torch, float64 by default (float32 where a solver asks for it), on the Gram's device. Damping is relative:
λ·mean(diag G)·I is added. A Cholesky that fails escalates λ through 1e-8 … 1e-1, then falls back to the
symmetric eigen root with clamped eigenvalues; every step is counted in the returned ``Whitening`` and nothing
falls back silently.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nesta_ray.errors import NumericalError
from nesta_ray.method.guards import check_finite, lapack

KINDS = ("cholesky", "eigen", "diagonal")
# Relative damping levels tried, in order, after the requested one when a Cholesky factorisation fails.
_ESCALATION = (1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@dataclass(frozen=True)
class Whitening:
    """A factor S (n, n) with S·Sᵀ = G + λ·mean(diag G)·I, and how it was obtained.

    ``kind`` is "cholesky" (S lower triangular), "eigen" (S = Q·diag(r)·Qᵀ) or "diagonal" (S = diag(r)).
    ``damping`` is the relative λ finally used; ``escalations`` counts the Cholesky retries with larger λ;
    ``eigen_fallback`` is True when Cholesky failed at every level and the eigen root was used instead;
    ``clamped`` counts eigenvalues (or diagonal scales) raised to the damping floor.
    Only the Cholesky kind stores S; the others keep Q and ``root``, which is all they need (an (n, n) fp64
    matrix is 6.6 GB at n = 28672).
    """

    kind: str
    damping: float
    escalations: int = 0
    eigen_fallback: bool = False
    clamped: int = 0
    S: torch.Tensor | None = None  # (n, n) lower triangular, for kind "cholesky"
    Q: torch.Tensor | None = None  # (n, n) eigenvectors, for kind "eigen"
    root: torch.Tensor | None = None  # (n,) square roots of the eigenvalues or the diagonal scales

    def apply(self, W: torch.Tensor) -> torch.Tensor:
        """W·S for W (m, n)."""
        if self.kind == "cholesky":
            assert self.S is not None
            return W @ self.S
        assert self.root is not None
        if self.kind == "eigen":
            assert self.Q is not None
            return ((W @ self.Q) * self.root) @ self.Q.T
        return W * self.root

    def times(self, M: torch.Tensor) -> torch.Tensor:
        """S·M for M (n, k)."""
        if self.kind == "cholesky":
            assert self.S is not None
            return self.S @ M
        assert self.root is not None
        if self.kind == "eigen":
            assert self.Q is not None
            return self.Q @ ((self.Q.T @ M) * self.root[:, None])
        return M * self.root[:, None]

    def right_solve(self, M: torch.Tensor) -> torch.Tensor:
        """M·S⁻¹ for M (k, n), by a triangular solve or the eigen/diagonal root; never an explicit inverse."""
        if self.kind == "cholesky":
            assert self.S is not None
            return torch.linalg.solve_triangular(self.S, M, upper=False, left=False)
        assert self.root is not None
        if self.kind == "eigen":
            assert self.Q is not None
            return ((M @ self.Q) / self.root) @ self.Q.T
        return M / self.root

    def fallbacks(self) -> dict[str, int]:
        """Counts of every numerical fallback taken, for the run report."""
        return {
            "damping_escalations": self.escalations,
            "eigen_fallbacks": int(self.eigen_fallback),
            "clamped_eigenvalues": self.clamped,
        }


def _gram_scale(G: torch.Tensor) -> float:
    scale = float(torch.diagonal(G).mean())
    if not scale > 0.0:
        raise NumericalError("the Gram matrix has a zero diagonal: the layer saw no non-zero input during calibration")
    return scale


def whiten(G: torch.Tensor, kind: str = "cholesky", damping: float = 1e-6,
           dtype: torch.dtype = torch.float64) -> Whitening:
    """Whitening factor of a Gram G (n, n) in ``dtype`` on G's device: Cholesky (variant I) or symmetric eigen root
    (variant II).

    Damping is relative: λ·mean(diag G)·I is added. When Cholesky fails, λ escalates through 1e-8 … 1e-1 and
    then falls back to the eigen root with eigenvalues floored at λ·mean(diag G); every step is counted in the
    returned ``Whitening``. Raises NumericalError for a non-finite or all-zero Gram, ValueError for another kind.
    """
    if kind not in ("cholesky", "eigen"):
        raise ValueError(f"whitening kind must be 'cholesky' or 'eigen', got {kind!r}")
    check_finite("Gram", G)
    G = G.to(dtype)  # (n, n); Cholesky and eigh read its lower triangle only, so it needs no symmetrising pass
    scale = _gram_scale(G)
    if kind == "eigen":
        return _eigen_root(G, damping, scale)
    levels = [damping] + [lam for lam in _ESCALATION if lam > damping]
    for step, lam in enumerate(levels):
        damped = G.clone()
        damped.diagonal().add_(lam * scale)
        L, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0 and bool(torch.isfinite(L).all()) and bool((torch.diagonal(L) > 0).all()):
            return Whitening("cholesky", damping=lam, escalations=step, S=L)
    # Cholesky failed at every level: the eigen root at the requested damping, eigenvalues below the floor clamped.
    fallback = _eigen_root(G, damping, scale)
    return Whitening(
        "eigen", damping=fallback.damping, escalations=len(levels) - 1, eigen_fallback=True,
        clamped=fallback.clamped, Q=fallback.Q, root=fallback.root,
    )


def _eigen_root(G: torch.Tensor, damping: float, scale: float) -> Whitening:
    """Symmetric root S = Q·diag(√(w + λ·scale))·Qᵀ; eigenvalues that stay below the floor are clamped."""
    w, Q = lapack("eigh", torch.linalg.eigh, G)  # (n,), (n, n)
    floor = max(damping, 1e-12) * scale
    shifted = w + damping * scale
    clamped = int((shifted < floor).sum())
    root = torch.sqrt(torch.clamp(shifted, min=floor))  # (n,)
    return Whitening("eigen", damping=damping, clamped=clamped, Q=Q, root=root)


def diagonal_scaling(abs_mean: torch.Tensor, alpha: float = 0.5, damping: float = 1e-6,
                     dtype: torch.dtype = torch.float64) -> Whitening:
    """ASVD's diagonal scaling S = diag(mean|x|^α) of abs-means (n,) in ``dtype``; zero scales are floored at
    damping·mean and counted. Raises NumericalError for non-finite or all-zero scales."""
    check_finite("activation abs-mean", abs_mean)
    s = abs_mean.to(dtype).clamp(min=0.0) ** alpha  # (n,)
    mean = float(s.mean())
    if not mean > 0.0:
        raise NumericalError("all activation scales are zero: the layer saw no non-zero input during calibration")
    floor = max(damping, 1e-12) * mean
    clamped = int((s < floor).sum())
    s = torch.clamp(s, min=floor)
    return Whitening("diagonal", damping=damping, clamped=clamped, root=s)
