"""Automatic ratio: the largest compression ratio whose perplexity on one evaluation set stays within a bound,
searched by ``ops.ratio_search`` on any ``Runner`` (in this process or on layer shards).

What every ratio shares is computed once by the runner (``prepare``): the calibration statistics (one dense
pass), one scaling per input group and one SVD of each scaled linear (σᵢ² is the exact loss of dropping
component i at any rank). A ratio then costs only the truncations, the nested residual SVDs and one evaluation.
Ratios are planned by the job's own plan builder (``plan_for``) and decomposed with the job's method, so the
factors the runner stages for the chosen ratio equal a fixed-ratio job's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from nesta_ray.config.method_section import AutoRatioConfig
from nesta_ray.config.schema import JobConfig
from nesta_ray.ops.evaluation import perplexity_of
from nesta_ray.ops.ratio_search import RatioChoice, RatioPoint, search_ratio
from nesta_ray.pipeline.runner import Runner
from nesta_ray.pipeline.shard_weights import Weights, at_ranks
from nesta_ray.plan.linears import plan_for


def choose_ratio(runner: Runner, cfg: JobConfig, skeleton: nn.Module, calib: torch.Tensor,
                 eval_ids: torch.Tensor, dense: float,
                 on_point: Callable[[RatioPoint], Any] = lambda p: None) -> RatioChoice[Weights]:
    """The largest ratio of ``method.auto``'s grid whose perplexity on ``eval_ids`` (W, L) is at most
    (1 + max_increase)·``dense``, with the weights of that ratio (stage them with ``runner.stage_ratio``).
    ``skeleton`` (the model on the meta device) is what ratios are planned on. Raises ConfigError when even the
    smallest ratio fails (naming the increase it reached)."""
    auto = cfg.method.auto
    assert isinstance(auto, AutoRatioConfig)
    plans = {r: plan_for(skeleton, cfg.with_ratio(r)) for r in auto.grid()}
    runner.prepare(calib)
    batch = cfg.evaluation.batch_size

    def attempt(r: float) -> tuple[float, Weights]:
        weights = at_ranks({p.name: p.rank for p in plans[r].modules})
        sums = runner.window_nll(eval_ids, weights, batch)
        return perplexity_of(sums, eval_ids.shape[1], auto.set).perplexity, weights

    return search_ratio(auto.grid(), dense, auto.max_increase, attempt, set_name=auto.set, on_point=on_point)
