"""The decomposition task Ray runs, and results crossing processes as numpy arrays."""

import numpy as np
import torch

from nesta_ray.method.decompose import Factors, InputStats, Method, decompose_group
from nesta_ray.pipeline.tasks import decompose_task
from nesta_ray.plan.linears import ModulePlan


def _group(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(200, 16, generator=g, dtype=torch.float64)
    stats = InputStats(X.T @ X / 200, X.abs().mean(0), 200)
    weights = {"q": torch.randn(12, 16, generator=g).numpy(), "k": torch.randn(8, 16, generator=g).numpy()}
    plans = [ModulePlan("q", 0, "attn_in", 12, 16, 5, None), ModulePlan("k", 0, "attn_in", 8, 16, 3, None)]
    return weights, plans, stats


def test_the_task_is_the_group_decomposition_with_its_seconds_shared():
    weights, plans, stats = _group()
    method = Method("nsvd1")
    out = decompose_task(weights, plans, method, stats, threads=1)
    ref = decompose_group({k: torch.tensor(v) for k, v in weights.items()}, {"q": 5, "k": 3}, method, stats)
    for name in ("q", "k"):
        assert torch.equal(out[name].A, ref[name].A) and torch.equal(out[name].B, ref[name].B)
        assert out[name].rank == {"q": 5, "k": 3}[name]
    assert out["q"].seconds == out["k"].seconds > 0


def test_results_and_statistics_travel_through_ray_as_arrays(ray_local):
    weights, plans, stats = _group(1)
    f = decompose_task(weights, plans, Method("asvd1"), stats, threads=1)["q"]
    back_f, back_s = ray_local.get([ray_local.put(f), ray_local.put(stats)])
    assert isinstance(back_f, Factors) and torch.equal(back_f.A, f.A) and back_f.stats() == f.stats()
    assert torch.equal(back_s.gram, stats.gram) and back_s.tokens == 200
    back_f.A.add_(1.0)  # writable copies, not read-only views of the object store
    assert not np.array_equal(back_f.A.numpy(), f.A.numpy())
