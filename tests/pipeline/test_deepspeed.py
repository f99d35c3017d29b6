"""The DeepSpeed ZeRO-Inference backend for real (DeepSpeed's CPU accelerator, gloo, a world of size 1 per shard):
the same Grams and the same factors as the layerwise backend, in both calibration modes, and clear config errors."""

import numpy as np
import pytest
import torch

from nesta_ray.checkpoint.stage import LayerStage
from nesta_ray.config.loading import validate
from nesta_ray.errors import ConfigError
from nesta_ray.io.sources import ModelSource, load_model
from nesta_ray.method.decompose import Method
from nesta_ray.model.arch import arch_for
from nesta_ray.pipeline.backends import BackendSpec, ShardPart
from nesta_ray.pipeline.embedded import compress_layerwise
from nesta_ray.pipeline.shard_group import compress_sharded
from nesta_ray.pipeline.shard_worker import LayerShard, ShardOptions
from nesta_ray.pipeline.tasks import Work
from nesta_ray.plan.linears import make_plan

ARGS = Method("nsvd1", k1_tolerance=None)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEEPSPEED = BackendSpec("deepspeed", "cpu")


def _plan(model):
    return make_plan(model, arch_for(model.config.model_type), method=ARGS, ratio=0.3, targets=TARGETS)


def _ids():
    return torch.randint(0, 2000, (4, 32), generator=torch.Generator().manual_seed(1))


def _staged(stage: LayerStage, layers) -> dict:
    return {k: v for i in layers for k, v in stage.get(i).items()}


def _shards(folder, plan, tmp_path, mode):
    return {name: LayerShard(ModelSource(folder, folder), ShardPart([0, 1, 2], first=True, last=True),
                             Work(plan, ARGS, micro_batch=2, mode=mode), LayerStage(str(tmp_path / name), "fp"),
                             ShardOptions(backend=spec))
            for name, spec in (("layerwise", BackendSpec()), ("deepspeed", DEEPSPEED))}


def _assert_same_factors(tmp_path, plan):
    a = _staged(LayerStage(str(tmp_path / "layerwise"), "fp"), range(3))
    b = _staged(LayerStage(str(tmp_path / "deepspeed"), "fp"), range(3))
    assert set(a) == set(b) == {p.name for p in plan.modules}
    for name in a:
        assert np.array_equal(a[name].A, b[name].A) and np.array_equal(a[name].B, b[name].B), name


def test_deepspeed_shard_gathers_the_same_grams_and_factors_as_layerwise(tiny3_folder, tmp_path):
    """Original mode, both backends in this process, micro-batch by micro-batch: the outputs, every Gram sum and
    every factor bit-identical."""
    model, _ = load_model(tiny3_folder)
    plan = _plan(model)
    ids = _ids()
    shards = _shards(tiny3_folder, plan, tmp_path, "original")
    assert type(shards["deepspeed"].backend).__name__ == "DeepSpeedBackend"
    inputs = [shards["layerwise"].embed(ids[s : s + 2].numpy()) for s in (0, 2)]
    for b, batch in enumerate(inputs):
        out = {name: shard.forward(b, batch) for name, shard in shards.items()}
        assert np.array_equal(out["layerwise"][0], out["deepspeed"][0])
    lw, ds = shards["layerwise"].grams, shards["deepspeed"].grams
    groups = {"attn_in", "attn_out", "mlp_in", "mlp_out"}
    assert set(lw) == set(ds) == {0, 1, 2} and all(set(lw[i]) == set(ds[i]) == groups for i in lw)
    for i in lw:
        for g in lw[i]:
            assert lw[i][g].tokens == ds[i][g].tokens == 4 * 32
            assert torch.equal(lw[i][g].gram_sum, ds[i][g].gram_sum), (i, g)
            assert torch.equal(lw[i][g].abs_sum, ds[i][g].abs_sum), (i, g)
    summaries = {name: shard.decompose(*inputs) for name, shard in shards.items()}
    assert summaries["deepspeed"]["computed"] == [0, 1, 2]
    _assert_same_factors(tmp_path, plan)
    shards["deepspeed"].close()


def test_deepspeed_propagate_mode_installs_factors_inside_zero3(tiny3_folder, tmp_path):
    """Propagate mode: each layer is compressed inside the ZeRO-3 engine before its outputs are recomputed, so
    later layers' Grams see the low-rank layers; outputs and factors equal layerwise's."""
    model, _ = load_model(tiny3_folder)
    plan = _plan(model)
    ids = _ids()
    shards = _shards(tiny3_folder, plan, tmp_path, "propagate")
    inputs = [shards["layerwise"].embed(ids[s : s + 2].numpy()) for s in (0, 2)]
    out = {name: shard.calibrate(*inputs) for name, shard in shards.items()}
    for (h_lw, _), (h_ds, _) in zip(out["layerwise"], out["deepspeed"]):
        assert np.array_equal(h_lw, h_ds)
    assert shards["deepspeed"].computed == [0, 1, 2]
    q = shards["deepspeed"].backend.layer(2).self_attn.q_proj
    assert type(q).__name__ == "LowRankLinear"
    _assert_same_factors(tmp_path, plan)
    shards["deepspeed"].close()


def test_two_deepspeed_shards_pipeline_to_the_embedded_factors(ray_local, tiny3_folder, tmp_path):
    """Two Ray actors, each its own ZeRO-3 world with CPU offload, micro-batches pipelined between them, against
    the embedded layer-wise loop."""
    model, _ = load_model(tiny3_folder)
    plan = _plan(model)
    embedded, _ = compress_layerwise(model, arch_for("llama"), _ids(), Work(plan, ARGS, micro_batch=2, mode="original"))
    stage = LayerStage(str(tmp_path / "ds"), "fp")
    out = compress_sharded(ModelSource(tiny3_folder, tiny3_folder), _ids(), Work(plan, ARGS, micro_batch=2, mode="original"), stage, 2,
                           ShardOptions(backend=DEEPSPEED))
    assert out["computed"] == [0, 1, 2] and [a["device"] for a in out["actors"]] == ["cpu", "cpu"]
    sharded = _staged(stage, range(3))
    assert set(sharded) == set(embedded)
    for name in embedded:
        assert np.array_equal(sharded[name].A, embedded[name].A), name
        assert np.array_equal(sharded[name].B, embedded[name].B), name


@pytest.mark.parametrize("runtime, message", [
    ({"backend": "deepspeed"}, "runtime: backend deepspeed runs inside layer-shard actors; set runtime.workers >= 1"),
    ({"backend": "deepspeed", "workers": 2, "offload": "nvme"}, "runtime: offload nvme needs runtime.nvme_path"),
    ({"workers": 2, "offload": "nvme", "nvme_path": "/nvme"}, "runtime: offload nvme is a deepspeed option"),
    ({"backend": "zero3", "workers": 2}, "runtime.backend: Input should be 'layerwise' or 'deepspeed'"),
])
def test_bad_backend_settings_are_refused_with_the_fix(runtime, message):
    with pytest.raises(ConfigError) as err:
        validate({"calibration": {"path": "x.txt"}, "output": {"uri": "out"}, "runtime": runtime})
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_deepspeed_settings_validate():
    rt = validate({"calibration": {"path": "x.txt"}, "output": {"uri": "out"},
                   "runtime": {"backend": "deepspeed", "workers": 2, "offload": "nvme", "nvme_path": "/nvme"}}).runtime
    assert (rt.backend, rt.offload, rt.nvme_path) == ("deepspeed", "nvme", "/nvme")
