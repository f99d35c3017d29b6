"""Low-rank factorisation of linear layers: SVD, ASVD, whitened SVD (SVD-LLM) and nested NSVD.

Pure torch: no I/O, no Ray, no transformers. Conventions:

* ``W`` is a Hugging Face weight of shape (m, n) = (out, in), applied as ``y = x @ W.T``.
* ``G`` is the normalised Gram of the layer's inputs, (n, n) = XᵀX / T for T tokens.
* A factor pair ``A`` (m, k), ``B`` (k, n) replaces W by A·B, so a rank-k layer holds k·(m+n) parameters.
* The whitened loss of an approximation W' is tr((W − W') G (W − W')ᵀ) = ‖(W − W')·S‖²_F for any S with
  S·Sᵀ = G: the mean squared output error per calibration token.

A ``Method`` (frozen) carries every knob from the config to ``decompose``; adding a method touches this module,
its config literal and its tests. All arithmetic runs in float64. Nothing non-finite leaves this module:
``NumericalError`` is raised instead.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

from nesta_ray.errors import NumericalError
from nesta_ray.method.anchored import anchored_left, anchored_loss, anchored_target
from nesta_ray.method.guards import check_finite, lapack
from nesta_ray.method.ranks import k1_by_tolerance, split_rank
from nesta_ray.method.tensors import NumpyPickled
from nesta_ray.method.whitening import Whitening, diagonal_scaling, whiten

MethodName = Literal["svd", "asvd0", "asvd1", "asvd2", "nsvd1", "nsvd2"]
METHODS: tuple[str, ...] = get_args(MethodName)
AnchorName = Literal["regression", "left"]  # the anchored fit (``method.anchored``)
# The input scaling each method applies before its SVD: none, ASVD's diagonal, or a whitening of the Gram.
SCALING_OF: dict[str, str | None] = {"svd": None, "asvd0": "diagonal", "asvd1": "cholesky", "asvd2": "eigen",
                                     "nsvd1": "cholesky", "nsvd2": "eigen"}
USV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # thin SVD: U (m, r), σ (r,), Vᵀ (r, n), r = min(m, n)


def is_nested(name: str) -> bool:
    """Whether method ``name`` spends part of the rank on a plain SVD of the residual (any string: reports may
    name methods this version does not know)."""
    return name.startswith("nsvd")


@dataclass(frozen=True)
class InputStats(NumpyPickled):
    """Calibration statistics of one layer input of width n: the normalised Gram G = XᵀX/T (n, n) and the mean
    |x| per channel (n,), both float64, over ``tokens`` tokens. Either may be None where no method needs it.
    The anchored fit (``method.anchored``) also needs, with ``gram`` then being Ĝ = X̂ᵀX̂/T of the compressed
    model's inputs X̂, the cross-Gram ``cross`` C = XᵀX̂/T against the dense model's inputs X and their Gram
    ``dense_gram`` G = XᵀX/T (``method.anchored`` has the maths)."""

    gram: torch.Tensor | None = None  # (n, n)
    abs_mean: torch.Tensor | None = None  # (n,)
    tokens: int = 0
    cross: torch.Tensor | None = None  # (n, n), anchored fit only
    dense_gram: torch.Tensor | None = None  # (n, n), anchored fit only


@dataclass(frozen=True)
class Method:
    """The decomposition knobs, from the config to ``decompose``.

    ``name`` is one of METHODS; ``k1_tolerance`` (nested methods) picks k1 per matrix, the smallest whose whitened
    loss is within (1 + tolerance) of the rank-k optimum, and None uses the global ``k1_fraction`` instead;
    ``damping`` is the relative Gram damping λ; ``alpha`` is ASVD's scaling exponent; ``anchored`` fits the
    whitened stage to the dense model's outputs from the compressed model's inputs (``method.anchored``; a
    whitened method only) by ``anchor``: "regression" (reduced-rank regression on all n input directions) or
    "left" (the whitened SVD's B of the compressed inputs, A refitted by a k-dimensional regression). Raises ValueError
    for an unknown name or a knob out of range.
    """

    name: MethodName = "nsvd1"
    k1_fraction: float = 0.95
    k1_tolerance: float | None = 0.02
    damping: float = 1e-6
    alpha: float = 0.5
    anchored: bool = False
    anchor: AnchorName = "regression"

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ValueError(f"unknown method {self.name!r}; choose one of {', '.join(METHODS)}")
        if not 0.0 <= self.k1_fraction <= 1.0 or not self.damping >= 0.0 or not self.alpha > 0.0:
            raise ValueError(f"method knobs out of range: {self}")
        if self.k1_tolerance is not None and self.k1_tolerance < 0:
            raise ValueError(f"k1_tolerance must be >= 0 or None, got {self.k1_tolerance}")
        if self.anchor not in get_args(AnchorName):
            raise ValueError(f"unknown anchor {self.anchor!r}; choose from {get_args(AnchorName)}")
        if self.anchored and self.scaling_kind not in ("cholesky", "eigen"):
            raise ValueError(f"the anchored fit needs a whitened method (asvd1/2, nsvd1/2), not {self.name}")

    @property
    def nested(self) -> bool:
        """True for the methods that spend part of the rank on a plain SVD of the residual."""
        return is_nested(self.name)

    @property
    def scaling_kind(self) -> str | None:
        """The input scaling applied before the SVD: None, "diagonal", "cholesky" or "eigen"."""
        return SCALING_OF[self.name]

    def scaling(self, stats: InputStats | None) -> Whitening | None:
        """The input scaling this method needs, from a layer input's statistics. Raises ValueError when the
        statistic it needs is missing, NumericalError as ``whiten``."""
        kind = self.scaling_kind
        if kind is None:
            return None
        if kind == "diagonal":
            if stats is None or stats.abs_mean is None:
                raise ValueError(f"method {self.name} needs the activation abs-mean statistics")
            return diagonal_scaling(stats.abs_mean, self.alpha, self.damping)
        if stats is None or stats.gram is None:
            raise ValueError(f"method {self.name} needs the Gram matrix of the layer inputs")
        return whiten(stats.gram, kind, self.damping)

    def planned_split(self, rank: int) -> tuple[int, int] | None:
        """(k1, k2) when the rank alone fixes them; None when k1 is chosen per matrix from the whitened spectrum."""
        if not self.nested:
            return rank, 0
        if self.k1_tolerance is not None:
            return None
        return split_rank(rank, self.k1_fraction)

    def split(self, rank: int, spectrum: torch.Tensor) -> tuple[int, int]:
        """(k1, k2) of a rank-``rank`` factorisation whose first stage has singular values ``spectrum`` (r,)."""
        fixed = self.planned_split(rank)
        if fixed is not None:
            return fixed
        assert self.k1_tolerance is not None
        k1 = k1_by_tolerance(spectrum, rank, self.k1_tolerance)
        return k1, rank - k1


@dataclass(frozen=True)
class Scaled:
    """A linear's input scaling and the thin SVD of its scaled weight W·S (of W itself without a scaling): computed
    once per linear, they serve every rank, since σᵢ² is the exact loss of dropping component i."""

    whitening: Whitening | None
    usv: USV


@dataclass(frozen=True)
class Factors(NumpyPickled):
    """One decomposed linear: its factor pair and the statistics that produced it.

    ``A`` (m, k) and ``B`` (k, n) with k = k1 + k2 (k2 = 0 unless nested); ``loss`` is the whitened loss of A·B
    under the undamped Gram (plain Frobenius loss when no Gram was given; the undamped anchored objective for
    the anchored fit); ``relative_loss`` divides it by tr(W·G·Wᵀ) (G the dense Gram); ``fallbacks`` counts the
    numerical fallbacks of its scaling; ``seconds`` is the time it took.
    Pickles its tensors as numpy arrays (``NumpyPickled``).
    """

    A: torch.Tensor  # (m, k)
    B: torch.Tensor  # (k, n)
    k1: int
    k2: int
    loss: float
    relative_loss: float
    fallbacks: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def rank(self) -> int:
        return self.k1 + self.k2

    def stats(self) -> dict[str, object]:
        """Everything but the tensors, as plain JSON values (for stages and nesta.json)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("A", "B")}

    @classmethod
    def from_stats(cls, A: torch.Tensor, B: torch.Tensor, stats: Mapping[str, object]) -> Factors:
        """The inverse of ``stats``: factors A (m, k), B (k, n) with their statistics. Raises KeyError or
        TypeError when a statistic is missing or unknown."""
        return cls(A=A, B=B, **stats)  # type: ignore[arg-type]


def _svd(M: torch.Tensor) -> USV:
    U, s, Vh = lapack("svd", lambda x: torch.linalg.svd(x, full_matrices=False), M)  # (m, r), (r,), (r, n)
    return U, s, Vh


def _truncate(U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors U_k·√Σ_k (m, k) and √Σ_k·V_kᵀ (k, n)."""
    root = torch.sqrt(s[:k])
    return U[:, :k] * root, root[:, None] * Vh[:k]


def whitened_svd(W: torch.Tensor, wh: Whitening) -> USV:
    """Thin SVD (U (m, r), σ (r,), Vᵀ (r, n)) of W·S in float64, r = min(m, n). One per matrix serves every rank:
    σ_i² is the exact whitened loss of dropping the i-th component. Raises NumericalError for non-finite input."""
    check_finite("weight", W)
    return _svd(wh.apply(W.detach().to(torch.float64)))


def scale(W: torch.Tensor, method: Method, stats: InputStats | None = None,
          whitening: Whitening | None = None) -> Scaled:
    """The method's scaling of W (m, n) (``whitening`` if given, e.g. shared by a group) and the SVD of W·S, or
    for the anchored fit of M = W·(C + μI)·S⁻ᵀ (``anchored_target``). Raises ValueError when the anchored fit
    lacks its statistics, ValueError / NumericalError as ``Method.scaling`` and ``whitened_svd``."""
    wh = whitening if whitening is not None else method.scaling(stats)
    if wh is None:
        check_finite("weight", W)
        return Scaled(None, _svd(W.detach().to(torch.float64)))
    if method.anchored and method.anchor == "regression":
        if stats is None or stats.gram is None or stats.cross is None:
            raise ValueError("the anchored fit needs the compressed-stream Gram and the cross-Gram "
                             "(calibration.mode: propagate)")
        return Scaled(wh, _svd(anchored_target(W, stats.gram, stats.cross, wh)))
    return Scaled(wh, whitened_svd(W, wh))


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


def _check_args(W: torch.Tensor, method: Method, rank: int, scaled: Scaled | None, k1: int | None) -> None:
    m, n = W.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank {rank} out of range [1, {min(m, n)}] for a {m}x{n} weight")
    if scaled is not None and (scaled.whitening is None) != (method.scaling_kind is None):
        raise ValueError(f"the precomputed SVD was made without the whitening method {method.name} needs")
    if k1 is not None and not (method.nested and 0 <= k1 <= rank):
        raise ValueError(f"k1 = {k1} needs an nsvd method and 0 <= k1 <= rank {rank}")
    if k1 is not None and method.nested and method.k1_tolerance is not None:
        raise ValueError("give k1 or method.k1_tolerance, not both")


def decompose(W: torch.Tensor, method: Method, rank: int, stats: InputStats | None = None, *,
              scaled: Scaled | None = None, k1: int | None = None,
              out_dtype: torch.dtype = torch.float32) -> Factors:
    """Factor W (m, n) at rank k into A (m, k), B (k, n) with ``method``.

    ``svd`` needs no statistics; ``asvd0`` needs ``stats.abs_mean`` (n,); the whitened methods need ``stats.gram``
    (n, n). ``scaled`` is ``scale(W, method, stats)`` computed once and reused across ranks or shared within an
    input group. Nested methods keep k1 of the scaled SVD (``k1`` if given, else ``method.split``) and spend
    k2 = k − k1 on a plain SVD of the residual; with ``method.anchored`` the first stage is the anchored fit
    (``stats`` then carries Ĝ, C and G). Raises ValueError for a bad rank or k1, NumericalError for
    non-finite inputs or results.
    """
    _check_args(W, method, rank, scaled, k1)
    check_finite("weight", W)
    W64 = W.detach().to(torch.float64)
    scaled = scaled if scaled is not None else scale(W64, method, stats)
    U, s, Vh = scaled.usv
    k1, k2 = (k1, rank - k1) if k1 is not None else method.split(rank, s)
    A, BS = _truncate(U, s, Vh, k1)  # (m, k1), (k1, n): B·S of the first stage
    B = scaled.whitening.right_solve(BS) if scaled.whitening is not None else BS
    if method.anchored and method.anchor == "left" and k1 > 0:
        if stats is None or stats.gram is None or stats.cross is None or scaled.whitening is None:
            raise ValueError("the anchored fit needs the compressed-stream Gram and the cross-Gram")
        mu = scaled.whitening.damping * float(torch.diagonal(stats.gram).mean())
        A = anchored_left(W64, B, stats.gram, stats.cross, mu)
    if k2 > 0:
        U2, s2, Vh2 = _svd(W64 - A @ B)  # residual (m, n)
        A2, B2 = _truncate(U2, s2, Vh2, k2)
        A, B = torch.cat([A, A2], dim=1), torch.cat([B, B2], dim=0)  # (m, k), (k, n)
    A, B = A.to(out_dtype).contiguous(), B.to(out_dtype).contiguous()
    check_finite(f"{method.name} factor A", A)
    check_finite(f"{method.name} factor B", B)
    if method.anchored:
        if stats is None or stats.gram is None or stats.cross is None or stats.dense_gram is None:
            raise ValueError("the anchored fit's loss needs the compressed, cross and dense Grams")
        loss, rel = anchored_loss(W64, A, B, stats.gram, stats.cross, stats.dense_gram)
    else:
        loss, rel = whitened_loss(W64, A, B, stats.gram if stats is not None else None)
    if not (math.isfinite(loss) and math.isfinite(rel)):
        raise NumericalError(f"{method.name} produced a non-finite whitened loss")
    fallbacks = scaled.whitening.fallbacks() if scaled.whitening is not None else {}
    return Factors(A, B, k1, k2, loss, rel, fallbacks)


def decompose_group(weights: Mapping[str, torch.Tensor], ranks: Mapping[str, int], method: Method,
                    stats: InputStats | None = None, *, out_dtype: torch.dtype = torch.float32) -> dict[str, Factors]:
    """Decompose linears that read the same input (e.g. q/k/v) with one shared scaling of their statistics.

    ``weights`` maps names to (m_i, n) weights; ``ranks`` gives each one's rank. Errors as in ``decompose``.
    """
    wh = method.scaling(stats)
    return {name: decompose(W, method, ranks[name], stats, scaled=scale(W, method, stats,
                                                                        whitening=wh) if wh is not None else None,
                            out_dtype=out_dtype)
            for name, W in weights.items()}
