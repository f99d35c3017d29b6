"""The run writer's pure parts: shard assignment, and refusing to write a run whose layers are not all staged."""

import pytest
import torch

from nesta_ray.checkpoint.runs import RunWriter
from nesta_ray.checkpoint.stage import LayerStage
from nesta_ray.checkpoint.writer import assign_shards, write_weights
from nesta_ray.errors import CheckpointError
from nesta_ray.io.sources import ModelSource, load_model
from nesta_ray.method.decompose import Method
from nesta_ray.model.arch import arch_for
from nesta_ray.plan.linears import make_plan


def test_groups_fill_shards_in_order_and_a_large_group_stands_alone():
    assert assign_shards([5, 5, 5, 20, 1], 10) == [0, 0, 1, 2, 3]
    assert assign_shards([3, 3, 3], 100) == [0, 0, 0]
    assert assign_shards([], 10) == []


def test_a_run_with_an_unstaged_layer_is_refused(tiny_folder, tmp_path):
    model, _ = load_model(tiny_folder)
    plan = make_plan(model, arch_for("llama"), method=Method("svd"), ratio=0.5, targets=["q_proj"])
    stage = LayerStage(str(tmp_path / "stage"), "fp")
    stage.put(0, {"model.layers.0.self_attn.q_proj": _svd(model, "model.layers.0.self_attn.q_proj")})
    writer = RunWriter(str(tmp_path / "out"), "r")
    with pytest.raises(CheckpointError, match=r"layers \[1\] are not staged"):
        write_weights(writer, ModelSource(tiny_folder, tiny_folder), plan, stage, arch_for("llama"), 2, 1 << 20)


def _svd(model, name):
    from nesta_ray.method.decompose import decompose

    return decompose(model.get_submodule(name).weight.detach(), Method("svd"), 4)


def test_weight_bytes_are_predicted_from_headers(tiny_folder, tmp_path):
    """Every shard is named with the final count, so the sizes the writer predicts must be the sizes it writes."""
    model, _ = load_model(tiny_folder)
    plan = make_plan(model, arch_for("llama"), method=Method("svd"), ratio=0.5, targets=["q_proj", "down_proj"])
    stage = LayerStage(str(tmp_path / "stage"), "fp")
    for layer in plan.layers():
        stage.put(layer, {name: _svd(model, name) for name in plan.names(layer)})
    writer = RunWriter(str(tmp_path / "out"), "r")
    records = write_weights(writer, ModelSource(tiny_folder, tiny_folder), plan, stage, arch_for("llama"), 2, 200_000)
    assert set(records) == {p.name for p in plan.modules} and all(r.rank == 4 for r in records.values())
    from safetensors.torch import load_file

    run = tmp_path / "out" / "runs" / "r"
    names = sorted(p.name for p in run.glob("model-*.safetensors"))
    assert names == [f"model-{i:05d}-of-{len(names):05d}.safetensors" for i in range(1, len(names) + 1)]
    tensors = {k: v for n in names for k, v in load_file(str(run / n)).items()}
    assert "model.layers.1.mlp.down_proj.A" in tensors and "model.layers.1.mlp.down_proj.weight" not in tensors
    assert tensors["model.layers.0.self_attn.q_proj.A"].dtype == torch.float32  # the source's weights are fp32


def test_factors_are_stored_in_the_dtype_of_the_weight_they_replace(tmp_path, smollm_folder):
    """A bfloat16 source gets bfloat16 factors (in float32 they would make the 'compressed' run larger than the
    source at 20%), and the predicted shard sizes stay exact."""
    from safetensors.torch import load_file

    from tiny import tiny_model

    model = tiny_model("llama", 2).to(torch.bfloat16)
    folder = tmp_path / "bf16"
    model.save_pretrained(folder)
    plan = make_plan(model, arch_for("llama"), method=Method("svd"), ratio=0.2, targets=["q_proj"])
    stage = LayerStage(str(tmp_path / "stage"), "fp")
    for layer in plan.layers():
        stage.put(layer, {n: _svd(model.float(), n) for n in plan.names(layer)})
    writer = RunWriter(str(tmp_path / "out"), "r")
    write_weights(writer, ModelSource(str(folder), str(folder)), plan, stage, arch_for("llama"), 2, 1 << 30)
    run = tmp_path / "out" / "runs" / "r"
    tensors = load_file(str(next(run.glob("model-*.safetensors"))))
    assert tensors["model.layers.1.self_attn.q_proj.B"].dtype == torch.bfloat16
    assert tensors["model.layers.1.mlp.up_proj.weight"].dtype == torch.bfloat16
