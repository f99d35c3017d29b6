"""Automatic ratio in this process: the largest compression ratio whose perplexity on one evaluation set stays
within a bound, searched by ``ops.ratio_search``.

What every ratio shares is computed once: the calibration statistics (one dense pass), one scaling per input
group and one SVD of each scaled linear (σᵢ² is the exact loss of dropping component i at any rank). A ratio then
costs only the truncation, the nested residual SVDs and one evaluation. Ratios are planned by the job's own plan
builder (``plan_for``) and decomposed with the job's method, so the chosen factors equal a fixed-ratio job's.
Runs on the whole model (``runtime.threads_per_task`` threads, the arithmetic of a job's decomposition tasks).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from nesta_ray.config.schema import AutoRatioConfig, JobConfig
from nesta_ray.method.decompose import Factors, InputStats, Method, Scaled, decompose, scale
from nesta_ray.model.arch import ArchSpec, arch_for
from nesta_ray.model.calibration import collect_statistics
from nesta_ray.model.layers import config_of, set_submodule, weight_of
from nesta_ray.model.lowrank import install_factors
from nesta_ray.ops.evaluation import perplexity
from nesta_ray.ops.ratio_search import RatioChoice, RatioPoint, search_ratio
from nesta_ray.plan.linears import Plan, plan_for


class _Prepared:
    """Per linear: its ``Scaled`` (the group's scaling, shared, and the SVD of the scaled weight) and its group's
    statistics. Weights are read from the model when needed (not cached in float64)."""

    def __init__(self, model: nn.Module, method: Method, stats: dict[int, dict[str, InputStats]], plan: Plan) -> None:
        self.model, self.method = model, method
        self.entries: dict[str, tuple[Scaled, InputStats]] = {}
        scalings: dict[tuple[int, str], Any] = {}
        for p in plan.modules:
            group_stats = stats[p.layer][p.group]
            if (p.layer, p.group) not in scalings:
                scalings[(p.layer, p.group)] = method.scaling(group_stats)
            W = weight_of(model.get_submodule(p.name)).detach().to(torch.float64)  # (m, n)
            self.entries[p.name] = (scale(W, method, whitening=scalings[(p.layer, p.group)]), group_stats)

    def factors(self, plan: Plan) -> dict[str, Factors]:
        """Every planned linear's factors at its planned rank, each from its cached SVD."""
        out = {}
        for p in plan.modules:
            scaled, stats = self.entries[p.name]
            W = weight_of(self.model.get_submodule(p.name)).detach()  # (m, n), decompose works in float64
            start = time.perf_counter()
            f = decompose(W, self.method, p.rank, stats, scaled=scaled)
            out[p.name] = dataclasses.replace(f, seconds=time.perf_counter() - start)
        return out


def choose_ratio(model: nn.Module, cfg: JobConfig, calib: torch.Tensor, eval_ids: torch.Tensor,
                 on_point: Callable[[RatioPoint], Any] = lambda p: None) -> RatioChoice[dict[str, Factors]]:
    """The largest ratio of ``method.auto``'s grid whose perplexity on ``eval_ids`` (W, L) is at most
    (1 + max_increase)·dense, with the factors at that ratio. ``model`` is left dense. Raises ConfigError when
    even the smallest ratio fails (naming the increase it reached)."""
    auto = cfg.method.auto
    assert isinstance(auto, AutoRatioConfig)
    torch.set_num_threads(cfg.runtime.threads_per_task)
    spec: ArchSpec = arch_for(config_of(model).model_type)
    plans = {r: plan_for(model, cfg.with_ratio(r)) for r in auto.grid()}
    first = plans[auto.grid()[0]]
    stats = collect_statistics(model, spec, first.layers(), calib, cfg.calibration.micro_batch)
    prepared = _Prepared(model, cfg.method.as_method(), stats, first)
    del stats
    dense = perplexity(model, eval_ids, name=auto.set).perplexity
    originals = {p.name: model.get_submodule(p.name) for p in first.modules}

    def attempt(r: float) -> tuple[float, dict[str, Factors]]:
        factors = prepared.factors(plans[r])
        install_factors(model, factors)
        ppl = perplexity(model, eval_ids, name=auto.set).perplexity
        for name, module in originals.items():
            set_submodule(model, name, module)
        return ppl, factors

    return search_ratio(auto.grid(), dense, auto.max_increase, attempt, set_name=auto.set, on_point=on_point)
