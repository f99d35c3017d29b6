"""Low-rank factorisation of linear layers: SVD, ASVD, whitened SVD (SVD-LLM) and nested NSVD.

Pure torch: no I/O, no Ray, no transformers. Conventions:

* ``W`` is a Hugging Face weight of shape (m, n) = (out, in), applied as ``y = x @ W.T``.
* ``G`` is the normalised Gram of the layer's inputs, (n, n) = XᵀX / T for T tokens.
* A factor pair ``A`` (m, k), ``B`` (k, n) replaces W by A·B, so a rank-k layer holds k·(m+n) parameters.
* The whitened loss of an approximation W' is tr((W − W') G (W − W')ᵀ) = ‖(W − W')·S‖²_F for any S with
  S·Sᵀ = G: the mean squared output error per calibration token.

All arithmetic runs in float64. Nothing non-finite leaves this module: ``NumericalError`` is raised instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch

from nesta_ray.errors import NumericalError

METHODS = ("svd", "asvd0", "asvd1", "asvd2", "nsvd1", "nsvd2")
WHITENING_OF = {"asvd1": "cholesky", "asvd2": "eigen", "nsvd1": "cholesky", "nsvd2": "eigen"}
# Relative damping levels tried, in order, after the requested one when a Cholesky factorisation fails.
_ESCALATION = (1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """Rank k = ⌊(1 − ratio)·m·n / (m + n)⌋ that removes ``ratio`` of an (m, n) layer's parameters.

    Raises ValueError for a ratio outside [0, 1) or a rank below 1.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    k = math.floor((1.0 - ratio) * m * n / (m + n) + 1e-9)
    if k < 1:
        raise ValueError(f"ratio {ratio} leaves rank {k} < 1 for a {m}x{n} layer")
    return k


def split_rank(k: int, k1_fraction: float) -> tuple[int, int]:
    """Nested split of rank k: k1 = round(f·k) for the whitened stage, k2 = k − k1 for the residual stage."""
    if not 0.0 <= k1_fraction <= 1.0:
        raise ValueError(f"k1_fraction must be in [0, 1], got {k1_fraction}")
    k1 = min(k, math.floor(k1_fraction * k + 0.5))
    return k1, k - k1


def tail_energy(s: torch.Tensor) -> torch.Tensor:
    """E (r + 1,) with E[j] = Σ_{i ≥ j} σ_i² for singular values σ (r,): the whitened loss of keeping rank j."""
    sq = s.to(torch.float64) ** 2
    return torch.cat([torch.flip(torch.cumsum(torch.flip(sq, (0,)), 0), (0,)), sq.new_zeros(1)])


def k1_by_tolerance(s: torch.Tensor, k: int, tol: float, min_k1: int = 0) -> int:
    """Per-matrix nested split from the whitened spectrum σ (r,) of W·S: the smallest k1 in [min_k1, k] whose
    whitened loss E[k1] is within (1 + tol) of the rank-k optimum E[k] (``tail_energy``). The residual stage
    only lowers the loss further, so the nested factorisation's whitened loss is at most (1 + tol)·E[k].

    tol = 0 gives k1 = k (plain whitened SVD) unless the spectrum is flat to zero below k. Raises ValueError for
    tol < 0 or k, min_k1 outside [0, r].
    """
    r = s.shape[0]
    if tol < 0 or not 0 <= min_k1 <= k <= r:
        raise ValueError(f"k1_by_tolerance needs tol >= 0 and 0 <= min_k1 <= k <= {r}; got tol={tol}, "
                         f"min_k1={min_k1}, k={k}")
    E = tail_energy(s)
    ok = torch.nonzero(E[min_k1 : k + 1] <= (1.0 + tol) * E[k]).flatten()  # never empty: j = k qualifies
    return min_k1 + int(ok[0])


def allocate_ranks(
    spectra: Mapping[str, torch.Tensor], costs: Mapping[str, int], budget: int, *, normalise: bool = True,
    min_ranks: Mapping[str, int] | None = None, max_ranks: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Ranks for many matrices under one parameter budget, from their whitened spectra (one ``whitened_svd`` each).

    Keeping singular value σ_i of matrix j lowers its whitened loss by exactly σ_i² and costs ``costs[j]`` = m + n
    parameters. With ``normalise`` the gain is σ_i² / Σσ² (the loss relative to tr(W·G·Wᵀ), so layers of
    different output scale compare). Starting from ``min_ranks`` (default 1), components are taken in decreasing
    gain per parameter while they fit; a matrix whose next component does not fit takes no more. The ranks never
    exceed ``max_ranks`` (default r) and Σ rank·cost ≤ budget. Before the first skipped component this is the
    exact optimum for the parameters it uses (a Lagrangian solution; gains fall within each matrix); in all
    cases it is within one component's gain of the best allocation for ``budget``.

    Raises ValueError when a name lacks a cost, a guard is out of [0, r] or min > max, or the minimum ranks
    already exceed the budget.
    """
    names = list(spectra)
    lo = {j: (min_ranks or {}).get(j, 1) for j in names}
    hi = {j: (max_ranks or {}).get(j, spectra[j].shape[0]) for j in names}
    for j in names:
        if j not in costs or costs[j] <= 0:
            raise ValueError(f"allocate_ranks: matrix {j!r} needs a positive cost (m + n)")
        if not 0 <= lo[j] <= hi[j] <= spectra[j].shape[0]:
            raise ValueError(f"allocate_ranks: matrix {j!r} has min rank {lo[j]}, max rank {hi[j]}, "
                             f"outside 0 <= min <= max <= {spectra[j].shape[0]}")
    left = budget - sum(lo[j] * costs[j] for j in names)
    if left < 0:
        raise ValueError(f"allocate_ranks: the minimum ranks need {budget - left} parameters, over the budget "
                         f"{budget}; lower min_ranks or raise the budget")
    ratio, owner = [], []
    for idx, j in enumerate(names):
        sq = spectra[j].to(torch.float64) ** 2
        gain = sq / sq.sum() if normalise and float(sq.sum()) > 0 else sq
        ratio.append(gain[lo[j] : hi[j]] / costs[j])
        owner.append(torch.full((hi[j] - lo[j],), idx, dtype=torch.long))
    ratio_all, owner_all = torch.cat(ratio), torch.cat(owner)
    order = torch.sort(-ratio_all, stable=True).indices  # stable: a matrix's components stay in index order
    ranks = dict(lo)
    blocked: set[int] = set()
    for idx in owner_all[order].tolist():
        if idx in blocked:
            continue
        j = names[idx]
        if costs[j] <= left:
            ranks[j] += 1
            left -= costs[j]
        else:
            blocked.add(idx)
    return ranks


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
            return W @ self.S
        if self.kind == "eigen":
            return ((W @ self.Q) * self.root) @ self.Q.T
        return W * self.root

    def right_solve(self, M: torch.Tensor) -> torch.Tensor:
        """M·S⁻¹ for M (k, n), by a triangular solve or the eigen/diagonal root; never an explicit inverse."""
        if self.kind == "cholesky":
            return torch.linalg.solve_triangular(self.S, M, upper=False, left=False)
        if self.kind == "eigen":
            return ((M @ self.Q) / self.root) @ self.Q.T
        return M / self.root

    def fallbacks(self) -> dict[str, int]:
        """Counts of every numerical fallback taken, for the run report."""
        return {
            "damping_escalations": self.escalations,
            "eigen_fallbacks": int(self.eigen_fallback),
            "clamped_eigenvalues": self.clamped,
        }


@dataclass(frozen=True)
class Factors:
    """One linear's factor pair and the statistics that produced it.

    ``A`` (m, k) and ``B`` (k, n) with k = k1 + k2 (k2 = 0 unless nested); ``loss`` is the whitened loss of A·B
    under the undamped Gram (plain Frobenius loss when no Gram was given); ``relative_loss`` divides it by
    tr(W·G·Wᵀ); ``spectrum`` holds the singular values of the first stage's (scaled) matrix.
    """

    A: torch.Tensor  # (m, k)
    B: torch.Tensor  # (k, n)
    k1: int
    k2: int
    loss: float
    relative_loss: float
    spectrum: torch.Tensor  # (min(m, n),)
    fallbacks: dict[str, int] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.k1 + self.k2


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise NumericalError(f"{name} holds non-finite values (NaN or Inf); check the model weights and inputs")


def _gram_scale(G: torch.Tensor) -> float:
    scale = float(torch.diagonal(G).mean())
    if not scale > 0.0:
        raise NumericalError("the Gram matrix has a zero diagonal: the layer saw no non-zero input during calibration")
    return scale


def whiten(G: torch.Tensor, kind: str = "cholesky", damping: float = 1e-6) -> Whitening:
    """Whitening factor of a Gram G (n, n): Cholesky (variant I) or symmetric eigen root (variant II).

    Damping is relative: λ·mean(diag G)·I is added. When Cholesky fails, λ escalates through 1e-8 … 1e-1 and
    then falls back to the eigen root with eigenvalues floored at λ·mean(diag G); every step is counted in the
    returned ``Whitening``. Raises NumericalError for a non-finite or all-zero Gram.
    """
    if kind not in ("cholesky", "eigen"):
        raise ValueError(f"whitening kind must be 'cholesky' or 'eigen', got {kind!r}")
    _check_finite("Gram", G)
    G = G.to(torch.float64)
    G = (G + G.T) / 2  # (n, n)
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
    w, Q = _linalg("eigh", torch.linalg.eigh, G)  # (n,), (n, n)
    floor = max(damping, 1e-12) * scale
    shifted = w + damping * scale
    clamped = int((shifted < floor).sum())
    root = torch.sqrt(torch.clamp(shifted, min=floor))  # (n,)
    return Whitening("eigen", damping=damping, clamped=clamped, Q=Q, root=root)


def diagonal_scaling(abs_mean: torch.Tensor, alpha: float = 0.5, damping: float = 1e-6) -> Whitening:
    """ASVD's diagonal scaling S = diag(mean|x|^α); zero scales are floored at damping·mean and counted."""
    _check_finite("activation abs-mean", abs_mean)
    s = abs_mean.to(torch.float64).clamp(min=0.0) ** alpha  # (n,)
    mean = float(s.mean())
    if not mean > 0.0:
        raise NumericalError("all activation scales are zero: the layer saw no non-zero input during calibration")
    floor = max(damping, 1e-12) * mean
    clamped = int((s < floor).sum())
    s = torch.clamp(s, min=floor)
    return Whitening("diagonal", damping=damping, clamped=clamped, root=s)


def _linalg(name: str, fn, M: torch.Tensor):
    """Run a LAPACK routine, turning its failure (e.g. no convergence) into a NumericalError."""
    try:
        return fn(M)
    except torch.linalg.LinAlgError as err:
        raise NumericalError(f"{name} of a {tuple(M.shape)} matrix failed ({err}); raise method.damping") from None


def _svd(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    U, s, Vh = _linalg("svd", lambda x: torch.linalg.svd(x, full_matrices=False), M)  # (m, r), (r,), (r, n)
    return U, s, Vh


def _truncate(U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors U_k·√Σ_k (m, k) and √Σ_k·V_kᵀ (k, n)."""
    root = torch.sqrt(s[:k])
    return U[:, :k] * root, root[:, None] * Vh[:k]


def whitened_svd(W: torch.Tensor, wh: Whitening) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U (m, r), σ (r,), Vᵀ (r, n)) of W·S in float64, r = min(m, n). One per matrix serves every rank:
    σ_i² is the exact whitened loss of dropping the i-th component. Raises NumericalError for non-finite input."""
    _check_finite("weight", W)
    return _svd(wh.apply(W.detach().to(torch.float64)))


def _whitened_stage(
    W: torch.Tensor, k: int, wh: Whitening, usv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-k approximation of W under the metric of wh: SVD of W·S, then B = √Σ_k·V_kᵀ·S⁻¹."""
    U, s, Vh = usv if usv is not None else _svd(wh.apply(W))  # SVD of W·S (m, n)
    A, BS = _truncate(U, s, Vh, k)  # (m, k), (k, n)
    return A, wh.right_solve(BS), s


def whitened_loss(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, G: torch.Tensor | None) -> tuple[float, float]:
    """(loss, relative loss) of A·B for W: tr(E·G·Eᵀ) with E = W − A·B, or ‖E‖²_F when G is None."""
    W = W.to(torch.float64)
    A, B = A.to(torch.float64), B.to(torch.float64)
    E = W - A @ B  # (m, n)
    if G is None:
        loss, ref = float((E * E).sum()), float((W * W).sum())
    else:
        WG = W @ G.to(torch.float64)  # (m, n), shared by both terms
        EG = WG - A @ (B @ G.to(torch.float64))  # (m, n) = E·G without a second m·n² product
        loss, ref = float((EG * E).sum()), float((WG * W).sum())
    return loss, (loss / ref if ref > 0 else 0.0)


def scaling_for(method: str, gram: torch.Tensor | None, abs_mean: torch.Tensor | None, alpha: float,
                damping: float) -> Whitening | None:
    """The input scaling a method needs: none for svd, ASVD's diagonal for asvd0, else the whitening of G.
    Raises ValueError when the statistic the method needs is missing."""
    if method == "asvd0":
        if abs_mean is None:
            raise ValueError("method asvd0 needs the activation abs-mean statistics")
        return diagonal_scaling(abs_mean, alpha, damping)
    if method in WHITENING_OF:
        if gram is None:
            raise ValueError(f"method {method} needs the Gram matrix of the layer inputs")
        return whiten(gram, WHITENING_OF[method], damping)
    return None


def decompose(
    W: torch.Tensor,
    method: str,
    rank: int,
    *,
    gram: torch.Tensor | None = None,
    abs_mean: torch.Tensor | None = None,
    k1_fraction: float = 0.95,
    damping: float = 1e-6,
    alpha: float = 0.5,
    whitening: Whitening | None = None,
    k1: int | None = None,
    k1_tol: float | None = None,
    usv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> Factors:
    """Factor W (m, n) at rank k into A (m, k), B (k, n) with the named method.

    ``svd`` needs nothing else; ``asvd0`` needs ``abs_mean`` (n,); the whitened methods need ``gram`` (n, n)
    or a precomputed ``whitening`` of it (so layers that share an input share one factorisation).
    ``nsvd*`` keep k1 of the whitened SVD (``k1`` if given; else ``k1_by_tolerance(σ, k, k1_tol)`` when ``k1_tol``
    is given; else round(f·k)) and spend k2 = k − k1 on a plain SVD of the residual. ``usv`` is ``whitened_svd(W, whitening)`` computed once and
    reused across ranks (it needs ``whitening`` too). Raises ValueError for an unknown method, a bad rank or k1,
    NumericalError for non-finite inputs or results.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    m, n = W.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank {rank} out of range [1, {min(m, n)}] for a {m}x{n} weight")
    _check_finite("weight", W)
    W64 = W.detach().to(torch.float64)
    wh = whitening if whitening is not None else scaling_for(method, gram, abs_mean, alpha, damping)

    if usv is not None and whitening is None:
        raise ValueError("usv (a precomputed whitened SVD) needs the whitening it was computed with")
    if k1 is not None and not (method.startswith("nsvd") and 0 <= k1 <= rank):
        raise ValueError(f"k1 = {k1} needs an nsvd method and 0 <= k1 <= rank {rank}")
    if k1 is not None and k1_tol is not None:
        raise ValueError("give k1 or k1_tol, not both")
    if method.startswith("nsvd") and k1 is None and k1_tol is not None:
        usv = usv if usv is not None else _svd(wh.apply(W64))  # the same SVD then serves the first stage
        k1 = k1_by_tolerance(usv[1], rank, k1_tol)
    if method.startswith("nsvd"):
        k1, k2 = (k1, rank - k1) if k1 is not None else split_rank(rank, k1_fraction)
    else:
        k1, k2 = rank, 0
    if method == "svd":
        U, spectrum, Vh = _svd(W64)
        A, B = _truncate(U, spectrum, Vh, rank)
    else:
        A, B, spectrum = _whitened_stage(W64, k1, wh, usv)
        if k2 > 0:
            U2, s2, Vh2 = _svd(W64 - A @ B)  # residual (m, n)
            A2, B2 = _truncate(U2, s2, Vh2, k2)
            A, B = torch.cat([A, A2], dim=1), torch.cat([B, B2], dim=0)  # (m, k), (k, n)
    A, B = A.to(out_dtype).contiguous(), B.to(out_dtype).contiguous()
    _check_finite(f"{method} factor A", A)
    _check_finite(f"{method} factor B", B)
    loss, rel = whitened_loss(W64, A, B, gram)
    if not (math.isfinite(loss) and math.isfinite(rel)):
        raise NumericalError(f"{method} produced a non-finite whitened loss")
    fallbacks = wh.fallbacks() if wh is not None else {}
    return Factors(A, B, k1, k2, loss, rel, spectrum.to(torch.float32), fallbacks)


def decompose_group(
    weights: Mapping[str, torch.Tensor],
    ranks: Mapping[str, int],
    method: str,
    *,
    gram: torch.Tensor | None = None,
    abs_mean: torch.Tensor | None = None,
    k1_fraction: float = 0.95,
    damping: float = 1e-6,
    alpha: float = 0.5,
    k1_tol: float | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> dict[str, Factors]:
    """Decompose linears that read the same input (e.g. q/k/v) with one shared whitening of their Gram.

    ``weights`` maps names to (m_i, n) weights; ``ranks`` gives each one's rank. Errors as in ``decompose``.
    """
    wh = scaling_for(method, gram, abs_mean, alpha, damping)
    return {
        name: decompose(
            W, method, ranks[name], gram=gram, abs_mean=abs_mean, k1_fraction=k1_fraction, damping=damping,
            alpha=alpha, whitening=wh, k1_tol=k1_tol, out_dtype=out_dtype,
        )
        for name, W in weights.items()
    }
