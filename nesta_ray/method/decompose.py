"""Low-rank factorisation of linear layers: SVD, ASVD, whitened SVD (SVD-LLM) and nested NSVD.

Pure torch: no I/O, no Ray, no transformers. Conventions:

* ``W`` is a Hugging Face weight of shape (m, n) = (out, in), applied as ``y = x @ W.T``.
* ``G`` is the normalised Gram of the layer's inputs, (n, n) = XᵀX / T for T tokens.
* A factor pair ``A`` (m, k), ``B`` (k, n) replaces W by A·B, so a rank-k layer holds k·(m+n) parameters.
* The whitened loss of an approximation W' is tr((W − W') G (W − W')ᵀ) = ‖(W − W')·S‖²_F for any S with
  S·Sᵀ = G: the mean squared output error per calibration token.

A ``Method`` (frozen) carries every knob from the config to ``decompose``; adding a method touches this module,
its config literal and its tests. A ``Solver`` (``factorize``) says where the arithmetic runs, at which precision
(float64 unless the device's policy chose float32) and by which factorisation. Nothing non-finite leaves this
module: ``NumericalError`` is raised instead.
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
from nesta_ray.method.factorize import USV, Solver, full_svd, residual_factors, spectrum, truncate
from nesta_ray.method.guards import check_finite
from nesta_ray.method.ranks import k1_by_tolerance, split_rank
from nesta_ray.method.tensors import NumpyPickled
from nesta_ray.method.whitening import Whitening, diagonal_scaling, whiten

MethodName = Literal["svd", "asvd0", "asvd1", "asvd2", "nsvd1", "nsvd2"]
METHODS: tuple[str, ...] = get_args(MethodName)
AnchorName = Literal["regression", "left"]  # the anchored fit (``method.anchored``)
# The input scaling each method applies before its SVD: none, ASVD's diagonal, or a whitening of the Gram.
SCALING_OF: dict[str, str | None] = {"svd": None, "asvd0": "diagonal", "asvd1": "cholesky", "asvd2": "eigen",
                                     "nsvd1": "cholesky", "nsvd2": "eigen"}


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

    def scaling(self, stats: InputStats | None, dtype: torch.dtype = torch.float64) -> Whitening | None:
        """The input scaling this method needs, from a layer input's statistics, in ``dtype`` on their device.
        Raises ValueError when the statistic it needs is missing, NumericalError as ``whiten``."""
        kind = self.scaling_kind
        if kind is None:
            return None
        if kind == "diagonal":
            if stats is None or stats.abs_mean is None:
                raise ValueError(f"method {self.name} needs the activation abs-mean statistics")
            return diagonal_scaling(stats.abs_mean, self.alpha, self.damping, dtype)
        if stats is None or stats.gram is None:
            raise ValueError(f"method {self.name} needs the Gram matrix of the layer inputs")
        return whiten(stats.gram, kind, self.damping, dtype)

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
    """A linear's input scaling and a factorisation of its scaled weight W·S (of W itself without a scaling): the
    thin SVD, or σ with the short side's singular vectors only (``factorize``); computed once per linear, they serve
    every rank, since σᵢ² is the exact loss of dropping component i. ``fallbacks`` counts the factorisation's."""

    whitening: Whitening | None
    usv: USV
    fallbacks: dict[str, int] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> Scaled:
        """The same on ``device`` (tensors moved; nothing copied where they already are)."""
        wh = self.whitening
        if wh is not None:
            wh = dataclasses.replace(wh, **{k: getattr(wh, k).to(device) for k in ("S", "Q", "root")
                                            if getattr(wh, k) is not None})
        usv = tuple(t.to(device) if t is not None else None for t in self.usv)
        return Scaled(wh, usv, dict(self.fallbacks))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Factors(NumpyPickled):
    """One decomposed linear: its factor pair and the statistics that produced it.

    ``A`` (m, k) and ``B`` (k, n) with k = k1 + k2 (k2 = 0 unless nested); ``loss`` is the whitened loss of A·B
    under the undamped Gram (plain Frobenius loss when no Gram was given; the undamped anchored objective for
    the anchored fit); ``relative_loss`` divides it by tr(W·G·Wᵀ) (G the dense Gram); ``fallbacks`` counts the
    numerical fallbacks of its scaling and factorisation; ``seconds`` is the time it took; ``solver`` says where
    and how it was factorised.
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
    solver: str = ""  # where and how it was factorised, e.g. "cpu float64 gram+randomized" (Solver.label)

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


def whitened_svd(W: torch.Tensor, wh: Whitening) -> USV:
    """Thin SVD (U (m, r), σ (r,), Vᵀ (r, n)) of W·S in float64, r = min(m, n). One per matrix serves every rank:
    σ_i² is the exact whitened loss of dropping the i-th component. Raises NumericalError for non-finite input."""
    check_finite("weight", W)
    return full_svd(wh.apply(W.detach().to(torch.float64)))


def on_solver(stats: InputStats | None, solver: Solver) -> InputStats | None:
    """``stats`` on the solver's device in its dtype (the same tensors where they already are)."""
    if stats is None:
        return None
    move = lambda t: None if t is None else t.to(solver.device, solver.torch_dtype)  # noqa: E731
    return InputStats(move(stats.gram), move(stats.abs_mean), stats.tokens, move(stats.cross),
                      move(stats.dense_gram))


def scale(W: torch.Tensor, method: Method, stats: InputStats | None = None,
          whitening: Whitening | None = None, solver: Solver | None = None) -> Scaled:
    """The method's scaling of W (m, n) (``whitening`` if given, e.g. shared by a group, on the solver's device)
    and the solver's factorisation of W·S, or for the anchored fit of M = W·(C + μI)·S⁻ᵀ (``anchored_target``),
    both where and as ``solver`` says (default: the CPU in float64). Raises ValueError when the anchored fit lacks
    its statistics, ValueError / NumericalError as ``Method.scaling`` and ``factorize.spectrum``."""
    solver = solver or Solver()
    stats = on_solver(stats, solver)
    wh = whitening if whitening is not None else method.scaling(stats, solver.torch_dtype)
    check_finite("weight", W)
    Wd = W.detach().to(solver.device, solver.torch_dtype)
    m, n = W.shape
    usv, fallbacks = spectrum(wh.apply(fit_target(Wd, method, stats, wh)) if wh is not None else Wd,
                              solver.first_for(m, n))
    return Scaled(wh, usv, fallbacks)


def fit_target(W: torch.Tensor, method: Method, stats: InputStats | None, wh: Whitening) -> torch.Tensor:
    """The weight (m, n) whose whitened truncation is the first stage: W itself, or for the anchored regression
    the damped least-squares fit W·(C + μI)·(Ĝ + μI)⁻¹ = M·S⁻¹ (by solves, on W's device in W's dtype), whose
    truncation in the Ĝ-whitened norm is the reduced-rank regression. Raises ValueError without Ĝ and C."""
    if not (method.anchored and method.anchor == "regression"):
        return W
    if stats is None or stats.gram is None or stats.cross is None:
        raise ValueError("the anchored fit needs the compressed-stream Gram and the cross-Gram "
                         "(calibration.mode: propagate)")
    return wh.right_solve(anchored_target(W, stats.gram, stats.cross, wh).to(W))


def whitened_loss(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, G: torch.Tensor | None) -> tuple[float, float]:
    """(loss, relative loss) of A·B for W: tr(E·G·Eᵀ) with E = W − A·B, or ‖E‖²_F when G is None; computed on W's
    device in W's dtype when that is float32 or float64 (else float64)."""
    dtype = W.dtype if W.dtype in (torch.float32, torch.float64) else torch.float64
    W = W.to(dtype)
    A, B = A.to(W), B.to(W)
    E = W - A @ B  # (m, n)
    if G is None:
        loss, ref = float((E * E).sum()), float((W * W).sum())
    else:
        WG = W @ G.to(W)  # (m, n), shared by both terms
        EG = WG - A @ (B @ G.to(W))  # (m, n) = E·G without a second m·n² product
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
              out_dtype: torch.dtype = torch.float32, solver: Solver | None = None) -> Factors:
    """Factor W (m, n) at rank k into A (m, k), B (k, n) (``out_dtype``, on the host) with ``method``, computing
    where and as ``solver`` says (default: the CPU in float64, the benchmark's fastest exact-enough methods).

    ``svd`` needs no statistics; ``asvd0`` needs ``stats.abs_mean`` (n,); the whitened methods need ``stats.gram``
    (n, n). ``scaled`` is ``scale(W, method, stats)`` computed once and reused across ranks or shared within an
    input group. Nested methods keep k1 of the scaled factorisation (``k1`` if given, else ``method.split``) and
    spend k2 = k − k1 on a plain truncated SVD of the residual; with ``method.anchored`` the first stage is the
    anchored fit (``stats`` then carries Ĝ, C and G). Raises ValueError for a bad rank or k1, NumericalError for
    non-finite inputs or results.
    """
    solver = solver or Solver()
    _check_args(W, method, rank, scaled, k1)
    check_finite("weight", W)
    given, stats = stats, on_solver(stats, solver)
    Wd = W.detach().to(solver.device, solver.torch_dtype)
    scaled = scaled.to(solver.device) if scaled is not None else scale(Wd, method, stats, solver=solver)
    k1, k2 = (k1, rank - k1) if k1 is not None else method.split(rank, scaled.usv[1])
    wh = scaled.whitening
    target = fit_target(Wd, method, stats, wh) if wh is not None else Wd
    A, B = truncate(scaled.usv, k1, target, wh.right_solve if wh else None, wh.times if wh else None)
    if method.anchored and method.anchor == "left" and k1 > 0:
        if stats is None or stats.gram is None or stats.cross is None or wh is None:
            raise ValueError("the anchored fit needs the compressed-stream Gram and the cross-Gram")
        mu = wh.damping * float(torch.diagonal(stats.gram).mean())
        A = anchored_left(Wd, B, stats.gram, stats.cross, mu).to(Wd)
    fallbacks = {**(wh.fallbacks() if wh is not None else {}), "gram_fallbacks": 0, "randomized_fallbacks": 0,
                 **scaled.fallbacks}
    if k2 > 0:
        A2, B2, more = residual_factors(Wd - A @ B, k2, solver)  # the residual (m, n)
        A, B = torch.cat([A, A2], dim=1), torch.cat([B, B2], dim=0)  # (m, k), (k, n)
        fallbacks = {k: fallbacks.get(k, 0) + more.get(k, 0) for k in fallbacks | more}
    A, B = A.to("cpu", out_dtype).contiguous(), B.to("cpu", out_dtype).contiguous()
    check_finite(f"{method.name} factor A", A)
    check_finite(f"{method.name} factor B", B)
    if method.anchored:
        if given is None or given.gram is None or given.cross is None or given.dense_gram is None:
            raise ValueError("the anchored fit's loss needs the compressed, cross and dense Grams")
        # on the host in float64, beside the host factors (a group's statistics may already be on the device)
        loss, rel = anchored_loss(W.detach().cpu(), A, B, given.gram.cpu(), given.cross.cpu(), given.dense_gram.cpu())
    else:
        loss, rel = whitened_loss(Wd, A, B, stats.gram if stats is not None else None)
    if not (math.isfinite(loss) and math.isfinite(rel)):
        raise NumericalError(f"{method.name} produced a non-finite whitened loss")
    m, n = W.shape
    return Factors(A, B, k1, k2, loss, rel, fallbacks, solver=solver.label(m, n, k2))


def decompose_group(weights: Mapping[str, torch.Tensor], ranks: Mapping[str, int], method: Method,
                    stats: InputStats | None = None, *, out_dtype: torch.dtype = torch.float32,
                    solver: Solver | None = None) -> dict[str, Factors]:
    """Decompose linears that read the same input (e.g. q/k/v) with one shared scaling of their statistics, all
    where and as ``solver`` says (the statistics moved there once).

    ``weights`` maps names to (m_i, n) weights; ``ranks`` gives each one's rank. Errors as in ``decompose``.
    """
    solver = solver or Solver()
    stats = on_solver(stats, solver)
    wh = method.scaling(stats, solver.torch_dtype)
    return {name: decompose(W, method, ranks[name], stats, out_dtype=out_dtype, solver=solver,
                            scaled=scale(W, method, stats, whitening=wh, solver=solver) if wh is not None else None)
            for name, W in weights.items()}
