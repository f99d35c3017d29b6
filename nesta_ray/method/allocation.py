"""Rank allocation by measured sensitivity: ranks for every linear under the parameter budget of uniform ranks.

Pure torch. A linear W (m, n) with whitened SVD W·S = Σ σ_i·u_i·v_iᵀ (S·Sᵀ = G, its input Gram) loses
ΔW·S = Σ_{i ≥ k} σ_i·u_i·v_iᵀ when truncated at rank k. To second order the model's loss grows by
½·E[(gᵀ·ΔW·x)²], g the loss gradient at the linear's output; with the Kronecker-factored curvature E[g gᵀ] ⊗ E[x xᵀ]
(K-FAC) that is ½·tr(F·ΔW·G·ΔWᵀ) with F = E[g gᵀ], and because the v_i are orthonormal

    D(k) = Σ_{i ≥ k} σ_i² · p_i,   p_i = u_iᵀ·F·u_i = E[(gᵀ u_i)²],

the sensitivity curve ``loss_curve`` builds from σ and the measured projections p (one backward pass of the
calibration loss). Unlike the whitened loss Σ_{i ≥ k} σ_i² (normalised per matrix, the allocation that lost in
docs/quality.md), D weighs each dropped output direction by how much the model's loss reacts to it, so it compares
linears of different layers and types on one scale: the model's loss.

``allocate`` then minimises Σ_j D_j under Σ_j cost_j ≤ budget, each linear at a rank in [min, ⌊mn/(m+n)⌋] (cost
k·(m+n)) or dense (cost m·n, D = 0): above the break-even rank a factor pair holds more parameters than W, so a
linear that would need it stays dense and its budget goes to the others. Greedy over the lower convex hull of each
linear's (cost, D) points, steepest loss decrease per parameter first; a hull segment that does not fit is taken
as far as it fits and the linear takes no more. This is the exact optimum of the convexified problem for the
parameters it spends, and within one segment's gain of the best allocation.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from nesta_ray.method.factorize import sigma_floor


def loss_curve(s: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """D (r + 1,) float64 with D[k] = Σ_{i ≥ k} σ_i²·p_i for singular values σ (r,) and projections p (r,) ≥ 0;
    non-increasing, D[r] = 0. Raises ValueError for mismatched lengths or a negative projection."""
    if s.shape != p.shape:
        raise ValueError(f"{s.shape[0]} singular values but {p.shape[0]} projections")
    if bool((p < 0).any()):
        raise ValueError("gradient projections are squares: they cannot be negative")
    terms = s.to(torch.float64) ** 2 * p.to(torch.float64)  # (r,)
    return torch.cat([torch.flip(torch.cumsum(torch.flip(terms, (0,)), 0), (0,)), terms.new_zeros(1)])


def output_directions(U: torch.Tensor | None, s: torch.Tensor, Vh: torch.Tensor | None,
                      X: torch.Tensor) -> torch.Tensor:
    """The left singular vectors U (m, r) of X (m, n) from its factorisation (U or None, σ (r,), Vᵀ (r, n) or
    None): U itself, else X·V·Σ⁻¹ (the Gram eigh of a tall X gives only V). A column whose σ is at most
    ``factorize.sigma_floor`` is left zero: its direction carries no loss (σ²·p ≈ 0) and dividing by σ would
    amplify rounding."""
    if U is not None:
        return U
    assert Vh is not None
    keep = s > sigma_floor(s)
    out = (X.to(Vh.dtype) @ Vh.T) / torch.where(keep, s, torch.ones_like(s))  # (m, r)
    return out * keep


def break_even_rank(m: int, n: int) -> int:
    """The largest rank whose factor pair holds no more parameters than the (m, n) weight: ⌊mn/(m+n)⌋."""
    return m * n // (m + n)


@dataclass(frozen=True)
class Allocation:
    """Ranks by linear name, the linears kept dense, the parameters they hold and the budget they were given,
    and the total predicted loss increase Σ D_j."""

    ranks: dict[str, int]
    dense: tuple[str, ...]
    params: int
    budget: int
    predicted_loss: float

    def as_dict(self) -> dict[str, Any]:
        return {"ranks": dict(sorted(self.ranks.items())), "dense": sorted(self.dense), "params": self.params,
                "budget": self.budget, "predicted_loss": self.predicted_loss}

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Allocation:
        """``as_dict``'s inverse. Raises KeyError, TypeError or ValueError for a malformed one."""
        return cls({str(k): int(v) for k, v in obj["ranks"].items()}, tuple(str(n) for n in obj["dense"]),
                   int(obj["params"]), int(obj["budget"]), float(obj["predicted_loss"]))


def _hull(points: list[tuple[int, float, int]]) -> list[tuple[int, float, int]]:
    """Lower convex hull of (cost, D, rank) points sorted by cost (monotone chain); rank −1 marks dense."""
    hull: list[tuple[int, float, int]] = []
    for pt in points:
        while len(hull) >= 2:
            (c0, d0, _), (c1, d1, _) = hull[-2], hull[-1]
            if (d1 - d0) * (pt[0] - c0) >= (pt[1] - d0) * (c1 - c0):  # hull[-1] lies on or above the chord
                hull.pop()
            else:
                break
        hull.append(pt)
    return hull


def _points(curve: torch.Tensor, m: int, n: int, lo: int, dense: bool) -> list[tuple[int, float, int]]:
    top = min(break_even_rank(m, n), curve.shape[0] - 1)
    pts = [(k * (m + n), float(curve[k]), k) for k in range(lo, top + 1)]
    return pts + [(m * n, 0.0, -1)] if dense else pts


def allocate(curves: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, int]], budget: int, *,
             min_ranks: Mapping[str, int] | None = None, allow_dense: bool = True) -> Allocation:
    """Ranks (or dense) for every linear of ``curves`` (name -> D (r + 1,), ``loss_curve``) with ``shapes``
    (name -> (m, n)) under ``budget`` parameters (module docstring). ``min_ranks`` (default 1) guard each rank.
    Raises ValueError when a shape is missing, a minimum is outside [0, break-even] or the minima exceed the
    budget."""
    names = list(curves)
    lo = {j: (min_ranks or {}).get(j, 1) for j in names}
    for j in names:
        if j not in shapes:
            raise ValueError(f"allocate: linear {j!r} has no shape")
        if not 0 <= lo[j] <= min(break_even_rank(*shapes[j]), curves[j].shape[0] - 1):
            raise ValueError(f"allocate: min rank {lo[j]} of {j!r} is outside [0, break-even "
                             f"{break_even_rank(*shapes[j])}]")
    hulls = {j: _hull(_points(curves[j], *shapes[j], lo[j], allow_dense)) for j in names}
    left = budget - sum(lo[j] * sum(shapes[j]) for j in names)
    if left < 0:
        raise ValueError(f"allocate: the minimum ranks need {budget - left} parameters, over the budget {budget}")
    at = dict.fromkeys(names, 0)  # index of each linear's current hull vertex
    heap = [(-_slope(hulls[j], 0), idx, j) for idx, j in enumerate(names) if len(hulls[j]) > 1]
    heapq.heapify(heap)
    chosen = {j: hulls[j][0] for j in names}
    while heap:
        _, idx, j = heapq.heappop(heap)
        here, there = hulls[j][at[j]], hulls[j][at[j] + 1]
        if there[0] - here[0] <= left:
            left -= there[0] - here[0]
            at[j] += 1
            chosen[j] = there
            if at[j] + 1 < len(hulls[j]):
                heapq.heappush(heap, (-_slope(hulls[j], at[j]), idx, j))
            continue
        partial = [pt for pt in _points(curves[j], *shapes[j], lo[j], allow_dense)
                   if here[0] < pt[0] <= here[0] + left]  # the segment as far as it fits; then no more
        if partial:
            left -= partial[-1][0] - here[0]
            chosen[j] = partial[-1]
    ranks = {j: pt[2] for j, pt in chosen.items() if pt[2] >= 0}
    dense = tuple(j for j, pt in chosen.items() if pt[2] < 0)
    return Allocation(ranks, dense, budget - left, budget, sum(pt[1] for pt in chosen.values()))


def _slope(hull: list[tuple[int, float, int]], i: int) -> float:
    """Loss decrease per parameter of the hull segment from vertex i to i + 1."""
    (c0, d0, _), (c1, d1, _) = hull[i], hull[i + 1]
    return (d0 - d1) / (c1 - c0)
