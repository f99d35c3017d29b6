"""Compressed checkpoints written through fsspec (local folder and moto's S3 server) and loaded back."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import nesta_ray
from nesta_ray.checkpoint.meta import RunMeta
from nesta_ray.checkpoint.reader import export_dense, load_any
from nesta_ray.checkpoint.runs import RunWriter
from nesta_ray.checkpoint.stage import LayerStage
from nesta_ray.checkpoint.writer import write_meta, write_model_files, write_weights
from nesta_ray.errors import CheckpointError
from nesta_ray.io.sources import ModelSource, load_model, model_files
from nesta_ray.method.decompose import Method
from nesta_ray.model.arch import arch_for
from nesta_ray.model.layers import tied_aliases
from nesta_ray.model.lowrank import LowRankLinear
from nesta_ray.pipeline.embedded import compress_layerwise
from nesta_ray.pipeline.tasks import Work
from nesta_ray.plan.linears import make_plan

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHOD = Method("nsvd2", k1_fraction=0.9, k1_tolerance=None)


@pytest.fixture(scope="module")
def compressed(ray_local, tiny_folder, tmp_path_factory):
    """A tiny model compressed for real (its factors staged as a job stages them), with its plan and source."""
    model, _ = load_model(tiny_folder)
    plan = make_plan(model, arch_for("llama"), method=METHOD, ratio=0.25, targets=TARGETS)
    ids = torch.randint(0, 2000, (4, 32), generator=torch.Generator().manual_seed(0))
    stage = LayerStage(str(tmp_path_factory.mktemp("stage")), "fp")
    compress_layerwise(model, arch_for("llama"), ids, Work(plan, METHOD, micro_batch=2, mode="original"), stage=stage)
    return model, (plan, stage), tiny_folder


def _write(model, staged, folder, root, run_id, storage_options=None, shard_bytes=1 << 20):
    """Commit a run the way the job's reducer does: tensors from the source and the stage, model files, nesta.json."""
    plan, stage = staged
    writer = RunWriter(root, run_id, storage_options)
    records = write_weights(writer, ModelSource(folder, folder), plan, stage, arch_for("llama"),
                            model.config.num_hidden_layers, shard_bytes)
    write_model_files(writer, folder, {name: r.rank for name, r in records.items()}, "float32")
    write_meta(writer, RunMeta(run_id, "float32", METHOD, 0.25, records, tied_aliases(model)))
    return writer.commit()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("where", ["local", "s3"])
def test_round_trip_gives_the_same_model(compressed, where, tmp_path, s3_server, monkeypatch):
    monkeypatch.setenv("NESTA_RAY_CACHE", str(tmp_path / "cache"))
    model, meta, folder = compressed
    if where == "s3":
        s3_server.make_bucket("ckpt-roundtrip")
        root, opts = "s3://ckpt-roundtrip/smol", s3_server.storage_options
    else:
        root, opts = str(tmp_path / "out"), None
    _write(model, meta, folder, root, "run-1", opts)
    loaded = nesta_ray.load_compressed(root, opts)
    ids = torch.randint(0, 2000, (2, 24))
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=0)
    q = loaded.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(q,
                      LowRankLinear) and q.rank == next(p.rank for p in meta[0].modules if p.name == "model.layers.0.self_attn.q_proj")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
    # the loaded model generates
    out = loaded.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


def test_shards_respect_the_size_limit_and_the_index_lists_every_tensor(compressed, tmp_path):
    model, meta, folder = compressed
    limit = 1 << 17
    run = Path(_write(model, meta, folder, str(tmp_path / "o"), "r", shard_bytes=limit))
    shards = sorted(run.glob("model-*.safetensors"))
    assert len(shards) > 2
    oversized = [s for s in shards if s.stat().st_size > limit + 16384]  # header allowance
    assert [s.name for s in oversized] == [shards[0].name]  # only the embedding, alone in its shard
    index = json.loads((run / "model.safetensors.index.nesta_lowrank.json").read_text())
    assert "model.layers.1.mlp.down_proj.A" in index["weight_map"]
    assert "lm_head.weight" not in index["weight_map"]  # tied: stored once
    assert {s.name for s in shards} == set(index["weight_map"].values())


def test_tampered_or_incomplete_checkpoints_are_refused(compressed, tmp_path):
    model, meta, folder = compressed
    run = Path(_write(model, meta, folder, str(tmp_path / "o"), "r"))
    shard = sorted(run.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=shard.name):
        nesta_ray.load_compressed(str(run))
    (run / "_SUCCESS").unlink()
    with pytest.raises(CheckpointError, match="_SUCCESS"):
        nesta_ray.load_compressed(str(run))
    with pytest.raises(CheckpointError):
        nesta_ray.load_compressed(str(tmp_path / "nothing-here"))


def test_dense_export_matches_the_low_rank_model(compressed, tmp_path, monkeypatch):
    monkeypatch.setenv("NESTA_RAY_CACHE", str(tmp_path / "cache"))
    model, meta, folder = compressed
    run = _write(model, meta, folder, str(tmp_path / "o"), "r")
    out = export_dense(run, str(tmp_path / "dense"))
    dense, _ = load_any(out)
    assert not any(isinstance(m, LowRankLinear) for m in dense.modules())
    ids = torch.randint(0, 2000, (2, 16))
    torch.testing.assert_close(_logits(dense, ids), _logits(model, ids), rtol=1e-4, atol=1e-4)


def _write_v1(model, staged, folder, root):
    """A run as format v1 was written: the source's own config.json, model.safetensors.index.json, no modeling
    files, version 1 in nesta.json and manifest.json."""
    plan, stage = staged
    writer = RunWriter(root, "v1")
    records = write_weights(writer, ModelSource(folder, folder), plan, stage, arch_for("llama"),
                            model.config.num_hidden_layers, 1 << 20)
    for path in model_files(folder):
        writer.put_file(os.path.basename(path), path)
    writer.put_json("nesta.json", RunMeta("v1", "float32", METHOD, 0.25, records, tied_aliases(model),
                                          format_version=1).to_json())
    run = Path(writer.commit(index_name="model.safetensors.index.json"))
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    return run


def test_a_v1_run_still_loads_through_the_same_classes(compressed, tmp_path, monkeypatch):
    monkeypatch.setenv("NESTA_RAY_CACHE", str(tmp_path / "cache"))
    model, meta, folder = compressed
    run = _write_v1(model, meta, folder, str(tmp_path / "o"))
    assert json.loads((run / "config.json").read_text())["model_type"] == "llama"
    loaded = nesta_ray.load_compressed(str(run))
    assert type(loaded).__name__ == "NestaLowRankForCausalLM"
    ids = torch.randint(0, 2000, (2, 16))
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=0)
    from nesta_ray.checkpoint.runs import weight_index
    from nesta_ray.io.weights import WeightStore

    index = weight_index(str(run))  # the shards read a published v1 run's factors (drift) through its own index
    assert index == "model.safetensors.index.json" and index != weight_index(str(_write(model, meta, folder,
                                                                                         str(tmp_path / "v2"), "r")))
    assert "model.layers.0.self_attn.q_proj.A" in WeightStore(str(run), None, index).entries
    loaded.save_pretrained(tmp_path / "saved")  # a v1 run saved again is the v2 form
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["model_type"] == "nesta_lowrank"


def test_a_weight_file_the_manifest_does_not_list_is_refused(compressed, tmp_path):
    model, meta, folder = compressed
    run = Path(_write(model, meta, folder, str(tmp_path / "o"), "r"))
    shutil.copy(sorted(run.glob("model-*.safetensors"))[0], run / "model.nesta_lowrank.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.nesta_lowrank\.safetensors is not listed in manifest\.json"):
        nesta_ray.load_compressed(str(run))
