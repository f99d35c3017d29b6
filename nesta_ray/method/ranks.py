"""Ranks: how many components a ratio leaves, how the nested method splits them, and ranks under one budget.

Pure torch. A rank-k factor pair of an (m, n) = (out, in) weight holds k·(m + n) parameters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch


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
