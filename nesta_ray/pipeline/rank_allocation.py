"""Rank allocation by measured sensitivity (``method.allocation: sensitivity``) on any ``Runner`` (in this
process or on layer shards): the uniform plan's parameter budget spent where the model's loss reacts most.

What it shares with the automatic ratio is the runner's ``prepare`` (one dense calibration pass, one scaled SVD
per linear); then one backward pass of the calibration loss over the first ``method.sensitivity_windows`` windows
measures each linear's loss curve (``runner.sensitivity``), and ``method.allocation.allocate`` chooses every rank
(or dense) under the budget. The factors at those ranks come from the same prepared SVDs (``stage_ratio``), so
they equal a fixed-rank decomposition's.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from nesta_ray.method.allocation import Allocation, allocate
from nesta_ray.pipeline.runner import Runner
from nesta_ray.plan.linears import Plan


def allocate_for(runner: Runner, plan: Plan, calib: torch.Tensor, windows: int) -> tuple[Allocation, dict[str, float]]:
    """Ranks for the linears of the uniform ``plan`` under its parameter count, from the sensitivity of the first
    ``windows`` of calibration windows ``calib`` (N, L), and the seconds of its steps (prepare: calibration and
    SVDs; sensitivity: the backward pass; allocate); leaves the runner prepared (``stage_ratio`` next)."""
    start = time.perf_counter()
    runner.prepare(calib)
    prepared = time.perf_counter()
    curves = runner.sensitivity(calib[:windows])
    measured = time.perf_counter()
    shapes = {p.name: (p.m, p.n) for p in plan.modules}
    allocation = allocate({p.name: torch.tensor(curves[p.name]) for p in plan.modules}, shapes, plan.params_after)
    return allocation, {"prepare": prepared - start, "sensitivity": measured - prepared,
                        "allocate": time.perf_counter() - measured}


def allocation_summary(allocation: Allocation, plan: Plan) -> dict[str, Any]:
    """The report's description of an allocation over the uniform ``plan``: totals, and per linear type (the
    last name component) how many stay dense and the ranks of the others against the uniform rank."""
    dense = set(allocation.dense)
    by_type: dict[str, dict[str, Any]] = {}
    for p in plan.modules:
        row = by_type.setdefault(p.name.rsplit(".", 1)[-1], {"linears": 0, "dense": 0, "uniform_rank": p.rank,
                                                             "ranks": []})
        row["linears"] += 1
        if p.name in dense:
            row["dense"] += 1
        else:
            row["ranks"].append(allocation.ranks[p.name])
    for row in by_type.values():
        ranks = row.pop("ranks")
        row.update(mean_rank=sum(ranks) / len(ranks) if ranks else None, min_rank=min(ranks, default=None),
                   max_rank=max(ranks, default=None))
    return {"kind": "sensitivity", "budget": allocation.budget, "params": allocation.params,
            "linears": len(plan.modules), "dense": len(dense),
            "dense_params": sum(p.params_before for p in plan.modules if p.name in dense),
            "predicted_loss": allocation.predicted_loss, "by_type": by_type}
