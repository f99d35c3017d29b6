"""The layer-wise pipeline with real Ray tasks on tiny models: plans, both calibration modes, determinism."""

import numpy as np
import pytest
import torch

from nesta_ray.method.decompose import Method
from nesta_ray.method.ranks import rank_for_ratio
from nesta_ray.model.arch import arch_for
from nesta_ray.model.lowrank import LowRankLinear
from nesta_ray.pipeline.embedded import compress_layerwise
from nesta_ray.pipeline.tasks import Work
from nesta_ray.plan.linears import make_plan

from tiny import tiny_model

ARGS = Method("nsvd1", k1_tolerance=None)
ANCHORED = Method("nsvd1", k1_tolerance=None, anchored=True)


def _plan(model, **kw):
    opts = dict(method=ARGS, ratio=0.3, targets=["q_proj", "k_proj", "v_proj", "o_proj",
                "gate_proj", "up_proj", "down_proj"])
    opts.update(kw)
    return make_plan(model, arch_for(model.config.model_type), **opts)


def test_plan_ranks_overrides_and_errors():
    model = tiny_model("llama", layers=3)
    plan = _plan(model, layers=[0, 2], rank_overrides={"model.layers.2.mlp.down_proj": 7})
    assert plan.layers() == [0, 2] and len(plan.modules) == 14
    q = next(p for p in plan.modules if p.name == "model.layers.0.self_attn.q_proj")
    assert (q.m, q.n, q.rank) == (64, 64, rank_for_ratio(64, 64, 0.3)) and sum(q.split) == q.rank
    assert next(p for p in plan.modules if p.name.endswith("2.mlp.down_proj")).rank == 7
    assert plan.params_after < 0.71 * plan.params_before
    with pytest.raises(ValueError, match="not planned"):
        _plan(model, rank_overrides={"model.layers.9.mlp.down_proj": 3})
    with pytest.raises(ValueError, match="out of range"):
        _plan(model, layers=[5])


@pytest.mark.parametrize("mode", ["original", "propagate"])
def test_compress_layerwise_installs_low_rank_modules(ray_local, mode):
    model = tiny_model("llama", layers=2)
    dense = tiny_model("llama", layers=2)
    plan = _plan(model)
    ids = torch.randint(0, 2000, (4, 32))
    results, timings = compress_layerwise(model, arch_for("llama"), ids, Work(plan, ARGS, micro_batch=2, mode=mode))
    assert set(results) == {p.name for p in plan.modules}
    for p in plan.modules:
        mod = model.get_submodule(p.name)
        assert isinstance(mod, LowRankLinear) and mod.rank == p.rank
        assert 0 <= results[p.name].relative_loss < 1
    with torch.no_grad():
        out, ref = model(input_ids=ids).logits, dense(input_ids=ids).logits
    assert torch.isfinite(out).all() and not torch.allclose(out, ref)
    assert timings.calibration > 0


def test_modes_agree_on_the_first_layer_and_differ_after(ray_local):
    ids = torch.randint(0, 2000, (4, 32))
    runs = {}
    for mode in ("original", "propagate"):
        model = tiny_model("llama", layers=2)
        runs[mode], _ = compress_layerwise(model, arch_for("llama"), ids, Work(_plan(model), ARGS, micro_batch=4,
                                                                               mode=mode))
    first = "model.layers.0.self_attn.q_proj"
    assert np.array_equal(runs["original"][first].A, runs["propagate"][first].A)
    later = "model.layers.1.mlp.down_proj"
    assert not np.array_equal(runs["original"][later].A, runs["propagate"][later].A)


def test_anchored_fit_matches_propagate_on_the_first_layer_and_differs_after(ray_local):
    """Layer 0 sees X̂ = X (the same embeddings), so the anchored fit is the propagate fit to rounding; after it
    the two streams differ, and so do the fits."""
    ids = torch.randint(0, 2000, (4, 32), generator=torch.Generator().manual_seed(2))
    runs = {}
    for name, method in (("propagate", ARGS), ("anchored", ANCHORED)):
        model = tiny_model("llama", layers=2)
        runs[name], _ = compress_layerwise(model, arch_for("llama"), ids, Work(_plan(model), method, micro_batch=2,
                                                                               mode="propagate"))
    for path in ("self_attn.q_proj", "mlp.down_proj"):
        first = f"model.layers.0.{path}"
        p, a = runs["propagate"][first], runs["anchored"][first]
        assert (p.k1, p.k2) == (a.k1, a.k2)
        np.testing.assert_allclose(a.A @ a.B, p.A @ p.B, rtol=0, atol=1e-4 * float(np.abs(p.A @ p.B).max()))
        assert a.relative_loss == pytest.approx(p.relative_loss, rel=1e-3, abs=1e-6)
    later = "model.layers.1.self_attn.q_proj"
    assert not np.allclose(runs["propagate"][later].A @ runs["propagate"][later].B,
                           runs["anchored"][later].A @ runs["anchored"][later].B)
    assert all(0 <= f.relative_loss < 1 for f in runs["anchored"].values())


def test_factors_are_bit_identical_across_runs(ray_local):
    ids = torch.randint(0, 2000, (4, 32))
    outs = []
    for _ in range(2):
        model = tiny_model("qwen2", layers=2)
        res, _ = compress_layerwise(model, arch_for("qwen2"), ids, Work(_plan(model), ARGS, micro_batch=2,
                                                                        mode="original"))
        outs.append(res)
    for name in outs[0]:
        assert np.array_equal(outs[0][name].A, outs[1][name].A)
        assert np.array_equal(outs[0][name].B, outs[1][name].B)


@pytest.mark.parametrize(("mode", "method"), [("original", ARGS), ("propagate", ARGS), ("propagate", ANCHORED)])
def test_embedded_one_and_two_shards_give_bit_identical_factors(ray_local, tiny3_folder, mode, method, tmp_path):
    from nesta_ray.checkpoint.stage import LayerStage
    from nesta_ray.io.sources import ModelSource, load_model
    from nesta_ray.pipeline.shard_group import compress_sharded

    model, _ = load_model(tiny3_folder)
    plan = _plan(model)
    ids = torch.randint(0, 2000, (4, 32), generator=torch.Generator().manual_seed(1))
    embedded, _ = compress_layerwise(model, arch_for("llama"), ids, Work(plan, method, micro_batch=2, mode=mode))
    for workers in (1, 2):
        stage = LayerStage(str(tmp_path / f"w{workers}"), "fp")
        out = compress_sharded(ModelSource(tiny3_folder, tiny3_folder), ids,
                               Work(plan, method, micro_batch=2, mode=mode), stage, workers)
        assert out["computed"] == [0, 1, 2]
        sharded = {k: v for i in range(3) for k, v in stage.get(i).items()}
        assert set(sharded) == set(embedded)
        for name in embedded:
            assert np.array_equal(sharded[name].A, embedded[name].A), (workers, name)
            assert np.array_equal(sharded[name].B, embedded[name].B), (workers, name)
        assert out["timings"]["max_actor_calibration"] > 0


def test_shard_ranges_are_contiguous_and_balanced():
    from nesta_ray.plan.sizing import shard_ranges

    assert shard_ranges(5, 2) == [[0, 1, 2], [3, 4]]
    assert shard_ranges(80, 8)[7] == list(range(70, 80))
    with pytest.raises(ValueError):
        shard_ranges(2, 3)


def test_a_task_failure_that_is_no_nesta_error_becomes_one_pipeline_error(ray_local):
    """A decomposition task that fails with an error of its own (here a rank the planner would never make) reaches
    the user as one PipelineError line, not as Ray's wrapped traceback."""
    import dataclasses

    from nesta_ray.errors import PipelineError
    from nesta_ray.plan.linears import Plan

    model = tiny_model("llama", layers=1)
    plan = _plan(model)
    broken = Plan([dataclasses.replace(plan.modules[0], rank=0)] + plan.modules[1:], plan.model_params)
    with pytest.raises(PipelineError, match=r"a decomposition task failed \(ValueError: rank 0 out of range") as err:
        compress_layerwise(model, arch_for("llama"), torch.randint(0, 2000, (2, 16)), Work(broken, ARGS, 2))
    assert "\n" not in str(err.value)
