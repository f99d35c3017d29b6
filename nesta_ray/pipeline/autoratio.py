"""Automatic ratio: the largest compression ratio whose perplexity on one evaluation set stays within a bound.

What every ratio shares is computed once: the calibration statistics (one dense pass), one whitening per input
group and one whitened SVD per linear (σᵢ² is the exact loss of dropping component i at any rank). A ratio then
costs only the truncation, the nested residual SVDs (nsvd) and one evaluation. The ratios tried are a grid, searched
by bisection for the largest one that passes; this assumes perplexity grows with the ratio, and every point
tried is reported, so a curve that does not is visible. Runs in the driver process on the whole model
(``runtime.threads_per_task`` threads, the same arithmetic as a job's decomposition tasks).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from nesta_ray.config import AutoRatioConfig, MethodConfig
from nesta_ray.decompose import Whitening, decompose, scaling_for, whitened_svd
from nesta_ray.errors import ConfigError
from nesta_ray.evaluate import perplexity
from nesta_ray.models import ArchSpec, set_submodule
from nesta_ray.pipeline.layerwise import collect_statistics, install_factors
from nesta_ray.pipeline.plan import make_plan

_WHITENED = ("asvd1", "asvd2", "nsvd1", "nsvd2")


@dataclass(frozen=True)
class RatioPoint:
    """One ratio tried: perplexity on the bounding set, its increase over dense, whether it passed, seconds spent."""

    ratio: float
    perplexity: float
    increase: float
    passed: bool
    seconds: float


@dataclass(frozen=True)
class RatioChoice:
    """The chosen ratio, the points walked (in the order tried), the dense perplexity, and the chosen factors
    per linear (result dicts as decomposition tasks return them)."""

    ratio: float
    points: list[RatioPoint]
    dense_perplexity: float
    results: dict[str, dict]

    def summary(self) -> dict:
        return {"ratio": self.ratio, "dense_perplexity": self.dense_perplexity,
                "points": [asdict(p) for p in sorted(self.points, key=lambda p: p.ratio)]}


class _Prepared:
    """Per linear: its group's whitening (shared with the other linears of the group), its whitened SVD, and its
    group's Gram and abs-mean. Weights are read from the model when needed (not cached in float64)."""

    def __init__(self, model: nn.Module, spec: ArchSpec, method: MethodConfig, stats: dict[int, tuple[dict, dict]],
                 names: dict[str, tuple[int, str]]) -> None:
        self.model, self.entries = model, {}
        whitenings: dict[tuple[int, str], Whitening | None] = {}
        for name, (layer, group) in names.items():
            grams, abs_means = stats[layer]
            gram, abs_mean = torch.from_numpy(grams[group].copy()), torch.from_numpy(abs_means[group].copy())
            if (layer, group) not in whitenings:
                whitenings[(layer, group)] = scaling_for(method.name, gram, abs_mean, method.alpha, method.damping)
            wh = whitenings[(layer, group)]
            W = model.get_submodule(name).weight.detach().to(torch.float64)  # (m, n)
            usv = whitened_svd(W, wh) if method.name in _WHITENED else None
            self.entries[name] = (wh, usv, gram, abs_mean)

    def factors(self, method: MethodConfig, ranks: dict[str, int]) -> dict[str, dict]:
        out = {}
        for name, rank in ranks.items():
            wh, usv, gram, abs_mean = self.entries[name]
            W = self.model.get_submodule(name).weight.detach()  # (m, n), decompose works in float64
            start = time.perf_counter()
            f = decompose(W, method.name, rank, gram=gram, abs_mean=abs_mean, k1_fraction=method.k1_fraction,
                          damping=method.damping, alpha=method.alpha, whitening=wh, usv=usv,
                          k1_tol=method.k1_tolerance if method.name.startswith("nsvd") else None)
            out[name] = {"A": f.A.numpy(), "B": f.B.numpy(), "k1": f.k1, "k2": f.k2, "loss": f.loss,
                         "relative_loss": f.relative_loss, "fallbacks": f.fallbacks,
                         "seconds": time.perf_counter() - start}
        return out


def search_ratio(model: nn.Module, spec: ArchSpec, method: MethodConfig, calib: torch.Tensor, eval_ids: torch.Tensor,
                 *, micro_batch: int, threads: int, on_point=lambda p: None) -> RatioChoice:
    """The largest ratio of ``method.auto``'s grid whose perplexity on ``eval_ids`` (W, L) is at most
    (1 + max_increase)·dense, with the factors at that ratio. ``model`` is left dense. Raises ConfigError when
    even the smallest ratio fails (naming the increase it reached)."""
    auto: AutoRatioConfig = method.auto
    torch.set_num_threads(threads)
    grid = auto.grid()
    plans = {r: make_plan(model, spec, method=method.name, ratio=r, k1_fraction=method.k1_fraction,
                          targets=method.targets, layers=method.layers, rank_overrides=method.rank_overrides)
             for r in grid}
    first = plans[grid[0]]
    names = {p.name: (p.layer, spec.group_of(p.name.rsplit(".", 1)[1])) for p in first.modules}
    stats = collect_statistics(model, spec, first.layers(), calib, micro_batch)
    prepared = _Prepared(model, spec, method, stats, names)
    del stats
    dense = perplexity(model, eval_ids, name=auto.set).perplexity
    originals = {name: model.get_submodule(name) for name in names}
    points: dict[float, RatioPoint] = {}
    passing: dict[str, dict] = {}  # factors of the largest ratio that passed so far (bisection only climbs)

    def attempt(r: float) -> bool:
        start = time.perf_counter()
        results = prepared.factors(method, {p.name: p.rank for p in plans[r].modules})
        install_factors(model, results)
        ppl = perplexity(model, eval_ids, name=auto.set).perplexity
        for name, module in originals.items():
            set_submodule(model, name, module)
        increase = ppl / dense - 1.0
        points[r] = RatioPoint(r, ppl, increase, bool(increase <= auto.max_increase), time.perf_counter() - start)
        on_point(points[r])
        if points[r].passed:
            passing.clear()
            passing.update(results)
        return points[r].passed

    lo, hi = 0, len(grid) - 1  # invariant: every index < lo passed, every index > hi failed
    while lo <= hi:
        mid = (lo + hi) // 2
        if attempt(grid[mid]):
            lo = mid + 1
        else:
            hi = mid - 1
    if hi < 0:
        p = points[grid[0]]
        raise ConfigError(f"method.auto: even the smallest ratio {grid[0]} raises {auto.set} perplexity by "
                          f"{p.increase:+.1%} (limit {auto.max_increase:+.1%}); lower method.auto.min_ratio or "
                          "raise method.auto.max_increase")
    chosen = grid[hi]
    return RatioChoice(chosen, list(points.values()), dense, passing)
