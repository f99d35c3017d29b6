"""Factorisations of a scaled weight X = W·S (m, n): which one, where, at which precision, and their cost.

Pure torch. The job needs the top k singular triplets of X and its total energy ‖X‖²_F, not the whole spectrum:

* ``svd``: LAPACK's thin SVD of X (U (m, r), σ (r,), Vᵀ (r, n), r = min(m, n)).
* ``gram``: the eigendecomposition of the short side's Gram: X·Xᵀ (m, m) when m <= n gives U and σ², and then
  A·B = U_k·U_kᵀ·W needs neither Vᵀ nor S⁻¹; Xᵀ·X (n, n) when m > n gives V and σ², and A = W·(S·V_k)/√σ.
  Squaring the matrix costs the components below √eps·σ₁ their relative accuracy; those are discarded anyway.
* ``randomized`` (the nested residual's few components only): a seeded Gaussian range finder with power
  iterations and a Rayleigh–Ritz step, accepted only when every kept Ritz pair's residual is within ``tol`` of its
  singular value (then an eigenvalue of R·Rᵀ lies within that relative distance of each σ²); otherwise the exact
  ``gram`` result is used and the fallback counted. Seeded, so every path gives the same factors.

A ``Solver`` says where (``device``), at which precision (``dtype``) and by which method (``first`` for the
whitened stage, ``residual`` for the nested stage; "auto" picks the method the factorisation benchmark found
fastest within 0.1% of the full SVD's whitened loss, ``AUTO``). ``flops`` is the work model the plan uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from nesta_ray.errors import NumericalError
from nesta_ray.method.guards import lapack

FIRST = ("svd", "gram")
RESIDUAL = ("svd", "gram", "randomized")
DTYPES = {"float64": torch.float64, "float32": torch.float32}
# "auto": what scripts/benchmark_factorize.py --quick measured on SmolLM2 (results/factorize_cpu_quick.md, a loaded
# machine): the short side's Gram eigh matched LAPACK's SVD within 0.1% in both losses on every linear and was
# 2.0-2.5x faster at 576x576 and 1536x576; at 192x576 (k/v) the SVD was as fast or faster, inside that run's noise,
# so one method is kept for every shape until the idle-machine run decides; on Gemma-3 (factorize_cpu_quick_gemma3.md)
# it was the fastest at all five shapes (1.8-12x). The randomized residual is not chosen:
# the real nested residuals have flat spectra (σ₁/σ₂₀ ≈ 1.1-1.3) and its sketch was accepted on none of 9.
AUTO: dict[str, str] = {"first": "gram", "residual": "gram"}
USV = tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]  # U (m, r) or None, σ (r,), Vᵀ (r, n) or None


# A job's ``runtime.factorization``: the (whitened stage, residual) methods it names.
FACTORIZATIONS = {"auto": ("auto", "auto"), "svd": ("svd", "svd"), "gram": ("gram", "gram"),
                  "gram+randomized": ("gram", "randomized")}


@dataclass(frozen=True)
class Solver:
    """Where and how linears are factorised: ``device`` ("cpu", "cuda", ...), ``dtype`` ("float64" | "float32"),
    the whitened stage's method ``first`` (FIRST or "auto") and the nested residual's ``residual`` (RESIDUAL or
    "auto"); the randomized range finder's ``oversample`` columns, ``power_iters`` and acceptance ``tol``.
    Raises ValueError for an unknown name."""

    device: str = "cpu"
    dtype: str = "float64"
    first: str = "auto"
    residual: str = "auto"
    oversample: int = 8
    power_iters: int = 4
    tol: float = 1e-2

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES or self.first not in (*FIRST, "auto") or self.residual not in (*RESIDUAL, "auto"):
            raise ValueError(f"unknown solver setting in {self}; dtype one of {list(DTYPES)}, first one of {FIRST}, "
                             f"residual one of {RESIDUAL} (or auto)")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def first_for(self, m: int, n: int) -> str:
        """The whitened stage's method for an (m, n) weight."""
        return AUTO["first"] if self.first == "auto" else self.first

    def residual_for(self, m: int, n: int, k2: int) -> str:
        """The residual stage's method for k2 components of an (m, n) residual."""
        return AUTO["residual"] if self.residual == "auto" else self.residual

    def label(self, m: int, n: int, k2: int) -> str:
        """How an (m, n) linear with a k2-component residual is factorised, e.g. "cpu float64 gram+randomized"."""
        how = self.first_for(m, n) + (f"+{self.residual_for(m, n, k2)}" if k2 > 0 else "")
        return f"{self.device} {self.dtype} {how}"


def solver_for(factorization: str, device: str = "cpu", dtype: str = "float64") -> Solver:
    """The solver of a job's ``runtime.factorization`` (a key of FACTORIZATIONS) on ``device`` in ``dtype``.
    Raises ValueError for an unknown name."""
    if factorization not in FACTORIZATIONS:
        raise ValueError(f"factorization must be one of {list(FACTORIZATIONS)}, got {factorization!r}")
    first, residual = FACTORIZATIONS[factorization]
    return Solver(device, dtype, first, residual)


def full_svd(X: torch.Tensor) -> USV:
    """LAPACK's thin SVD of X (m, n). Raises NumericalError when it fails."""
    U, s, Vh = lapack("svd", lambda x: torch.linalg.svd(x, full_matrices=False), X)
    return U, s, Vh


def _descending(w: torch.Tensor, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """σ (r,) descending and the matching columns from ascending eigenvalues w of a Gram (negatives are rounding)."""
    return torch.sqrt(torch.clamp(torch.flip(w, (0,)), min=0.0)), torch.flip(vectors, (1,))


def gram_svd(X: torch.Tensor) -> USV:
    """σ and the short side's singular vectors of X (m, n) from the eigendecomposition of X·Xᵀ (m <= n: U, no Vᵀ)
    or Xᵀ·X (m > n: Vᵀ, no U). Raises NumericalError when eigh fails."""
    m, n = X.shape
    if m <= n:
        s, U = _descending(*lapack("eigh", torch.linalg.eigh, X @ X.T))
        return U, s, None
    s, V = _descending(*lapack("eigh", torch.linalg.eigh, X.T @ X))
    return None, s, V.T


def spectrum(X: torch.Tensor, how: str) -> tuple[USV, dict[str, int]]:
    """The ``how`` ("svd" | "gram") factorisation of X (m, n) and its fallbacks: a failed eigh falls back to the
    full SVD and counts one ``gram_fallbacks``. Raises NumericalError when the SVD fails too."""
    if how == "svd":
        return full_svd(X), {}
    try:
        return gram_svd(X), {"gram_fallbacks": 0}
    except NumericalError:  # a failed eigh: the full SVD is exact, so count it and use it
        return full_svd(X), {"gram_fallbacks": 1}


def sigma_floor(s: torch.Tensor) -> float:
    """eps·σ₁ + tiny for descending singular values σ (r,): below it a singular value is rounding, never zero."""
    return torch.finfo(s.dtype).eps * (float(s[0]) if s.numel() else 1.0) + torch.finfo(s.dtype).tiny


def _balance(s: torch.Tensor) -> torch.Tensor:
    """σ floored at ``sigma_floor`` (never zero), so that factors can be balanced by √σ."""
    return torch.clamp(s, min=sigma_floor(s))


def truncate(usv: USV, k: int, W: torch.Tensor, right: Callable[[torch.Tensor], torch.Tensor] | None = None,
             left: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced rank-k factors A (m, k), B (k, n) of W (m, n) from a factorisation ``usv`` of X = W·S, with
    ``right`` = M ↦ M·S⁻¹ and ``left`` = M ↦ S·M (None: S = I). A·B = U_k·Σ_k·V_kᵀ·S⁻¹ in every form."""
    U, s, Vh = usv
    if U is not None and Vh is not None:  # full SVD: A = U_k·√Σ, B = √Σ·V_kᵀ·S⁻¹
        root = torch.sqrt(s[:k])
        BS = root[:, None] * Vh[:k]
        return U[:, :k] * root, right(BS) if right is not None else BS
    root = torch.sqrt(_balance(s[:k]))
    if U is not None:  # A·B = U_k·U_kᵀ·W
        return U[:, :k] * root, (U[:, :k].T @ W) / root[:, None]
    assert Vh is not None
    SV = left(Vh[:k].T) if left is not None else Vh[:k].T  # (n, k) = S·V_k
    BS = root[:, None] * Vh[:k]
    return (W @ SV) / root, right(BS) if right is not None else BS


def randomized_svd(R: torch.Tensor, k: int, oversample: int, power_iters: int, seed: int = 0) -> USV:
    """The top k singular triplets of R (m, n) from a seeded Gaussian sketch of k + ``oversample`` columns, refined
    by ``power_iters`` power iterations (re-orthonormalised each half step) and a Rayleigh–Ritz step."""
    m, n = R.shape
    q = min(k + oversample, m, n)
    gen = torch.Generator(device=R.device).manual_seed(seed)
    Q = torch.linalg.qr(R @ torch.randn(n, q, generator=gen, device=R.device, dtype=R.dtype)).Q  # (m, q)
    for _ in range(power_iters):
        Q = torch.linalg.qr(R @ torch.linalg.qr(R.T @ Q).Q).Q
    Ub, s, Vh = torch.linalg.svd(Q.T @ R, full_matrices=False)  # (q, q), (q,), (q, n)
    return (Q @ Ub)[:, :k], s[:k], Vh[:k]


def ritz_accepted(R: torch.Tensor, usv: USV, tol: float) -> bool:
    """Whether every Ritz pair (σᵢ, uᵢ, vᵢ) of R has ‖R·vᵢ − σᵢ·uᵢ‖ <= tol·σᵢ (then R·Rᵀ has an eigenvalue within
    tol·σᵢ² of σᵢ²; Rᵀ·uᵢ = σᵢ·vᵢ holds exactly for a Rayleigh–Ritz pair)."""
    U, s, Vh = usv
    assert U is not None and Vh is not None
    if s.numel() == 0 or not float(s[0]) > 0.0:
        return bool(s.numel() == 0)
    gap = torch.linalg.vector_norm(R @ Vh.T - U * s, dim=0)  # (k,)
    return bool((gap <= tol * torch.clamp(s, min=torch.finfo(s.dtype).tiny)).all())


def residual_factors(R: torch.Tensor, k2: int, solver: Solver) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """Balanced rank-k2 factors A2 (m, k2), B2 (k2, n) of the residual R (m, n) (its plain truncated SVD) by the
    solver's residual method, and the fallbacks counted (``randomized_fallbacks``: the sketch was not accepted, so
    the exact Gram result was used). Raises NumericalError when every method fails."""
    m, n = R.shape
    how = solver.residual_for(m, n, k2)
    fallbacks: dict[str, int] = {}
    if how == "randomized":
        usv = randomized_svd(R, k2, solver.oversample, solver.power_iters)
        accepted = ritz_accepted(R, usv, solver.tol) and bool(torch.isfinite(usv[1]).all())
        fallbacks["randomized_fallbacks"] = int(not accepted)
        if accepted:
            A2, B2 = truncate(usv, k2, R)
            return A2, B2, fallbacks
        how = "gram"
    usv, more = spectrum(R, how)
    A2, B2 = truncate(usv, k2, R)
    return A2, B2, {**fallbacks, **more}


def flops(m: int, n: int, k: int, k2: int, solver: Solver) -> dict[str, float]:
    """Work model of one linear's factorisation (FLOPs by kind: "gemm" products, "eigh", "svd", "cholesky" of its
    input Gram, "qr"), for the plan: the whitening, the whitened stage, the residual, the loss under the Gram."""
    r, big = min(m, n), max(m, n)
    out: dict[str, float] = {"gemm": 2.0 * m * n * n, "eigh": 0.0, "svd": 0.0, "cholesky": n**3 / 3.0, "qr": 0.0}
    stages: list[tuple[str, int]] = [(solver.first_for(m, n), k)]
    if k2 > 0:
        stages.append((solver.residual_for(m, n, k2), k2))
        out["gemm"] += 2.0 * m * n * k  # the residual W − A·B
    for how, kk in stages:
        if how == "svd":
            out["svd"] += 4.0 * big * r * r + 22.0 * r**3
        elif how == "gram":
            out["gemm"] += 2.0 * r * r * big + 2.0 * m * n * kk
            out["eigh"] += 9.0 * r**3
        else:
            q = min(kk + solver.oversample, r)
            out["gemm"] += 2.0 * m * n * q * (2 * solver.power_iters + 3)
            out["qr"] += 4.0 * big * q * q * (2 * solver.power_iters + 1)
    out["gemm"] += 2.0 * m * n * n + 2.0 * k * n * n + 4.0 * m * n * k  # the loss: W·G, B·G, A·(B·G), A·B
    return out
