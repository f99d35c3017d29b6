"""Corrupt model sources (Hugging Face folders, GGUF files, pickle-only folders) through the dry run's pre-flight and
``evaluate --model``: refused by name before transformers (or torch.load) reads them."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from nesta_ray.compress import main as compress_main
from nesta_ray.errors import ModelError
from nesta_ray.evaluate import main as evaluate_main
from nesta_ray.io.weights import WeightStore

WEIGHTS = "model.safetensors"


def _damage(folder: Path, kind: str) -> None:
    """Damage the model folder copy ``folder`` in the way ``kind`` names."""
    config, weights = folder / "config.json", folder / WEIGHTS
    if kind == "cut_config":
        config.write_text(config.read_text()[:40])
    elif kind == "config_list":
        config.write_text("[1, 2]")
    elif kind == "config_bert":
        config.write_text(json.dumps({**json.loads(config.read_text()), "model_type": "bert"}))
    elif kind == "no_config":
        config.unlink()
    elif kind == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif kind == "random_weights":
        weights.write_bytes(os.urandom(4096))
    elif kind == "huge_header":
        weights.write_bytes((1 << 62).to_bytes(8, "little") + b"{}")
    elif kind == "header_not_json":
        weights.write_bytes((16).to_bytes(8, "little") + b"not json at all!" + b"\0" * 64)
    elif kind == "padded":
        weights.write_bytes(weights.read_bytes() + b"\0" * 1000)
    elif kind == "pickle_only":
        weights.unlink()
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle that must never be loaded")
    elif kind == "no_weights":
        weights.unlink()
    elif kind in ("index_absolute", "index_parent", "index_url"):
        target = {"index_absolute": str(weights.resolve()), "index_parent": "../model.safetensors",
                  "index_url": "http://127.0.0.1:9/model.safetensors"}[kind]
        tensors = load_file(str(weights))
        weights.unlink()
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(tensors, target)}))
    elif kind == "index_not_json":
        (folder / "model.safetensors.index.json").write_text("{cut")
    elif kind == "missing_q_proj":
        tensors = load_file(str(weights))
        del tensors["model.layers.1.self_attn.q_proj.weight"]
        save_file(tensors, str(weights), metadata={"format": "pt"})
    elif kind == "wrong_shape":
        tensors = load_file(str(weights))
        tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"][:10].clone()
        save_file(tensors, str(weights), metadata={"format": "pt"})
    else:
        raise AssertionError(kind)


# (damage, what the first stderr line says)
BAD_FOLDERS = [
    ("cut_config", "config.json"), ("config_list", "config.json"), ("config_bert", "bert"),
    ("no_config", "config.json"), ("truncated", "truncated"), ("random_weights", "not a safetensors file"),
    ("huge_header", "not a safetensors file"), ("header_not_json", "malformed safetensors header"),
    ("padded", "padded"), ("pickle_only", "pytorch_model.bin"), ("no_weights", "no weights"),
    ("index_absolute", "not a relative path"), ("index_parent", "not a relative path"),
    ("index_url", "not a relative path"), ("index_not_json", "not a tensor index"),
]


@pytest.fixture
def damaged(tmp_path, tiny3_folder):
    def make(kind: str) -> str:
        folder = tmp_path / f"model-{kind}"
        shutil.copytree(tiny3_folder, folder)
        _damage(folder, kind)
        return str(folder)

    return make


@pytest.mark.parametrize(("kind", "says"), BAD_FOLDERS + [("missing_q_proj", "q_proj"), ("wrong_shape", "up_proj")])
def test_a_damaged_model_folder_is_refused_by_the_dry_run(job, refused, damaged, kind, says):
    args = ["--config", job.write(), "--dry-run", "--set", f"model.source={damaged(kind)}"]
    refused(lambda: compress_main(args), ("model", says), watch=(job.out,))


@pytest.mark.parametrize(("kind", "says"), BAD_FOLDERS)
def test_a_damaged_model_folder_is_refused_by_evaluate(refused, damaged, texts, kind, says):
    folder = damaged(kind)
    refused(lambda: evaluate_main(["--model", folder, "--text", texts["text"], "--seq-len", "64"]), says,
            watch=(folder,))


@pytest.mark.parametrize("kind", ["index_absolute", "index_parent", "index_url"])
def test_the_weight_store_reads_no_file_outside_its_folder(damaged, kind):
    with pytest.raises(ModelError, match="not a relative path"):
        WeightStore(damaged(kind))


def _gguf(path: Path, kind: str) -> str:
    """A GGUF file: ``header`` (valid header and tensor table, random tensors, no model in it), ``truncated`` (that
    file cut), ``random`` (random bytes), ``magic_only``."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((64, 32)).astype(np.float32))
    writer.add_tensor("blk.0.attn_q.weight", rng.standard_normal((32, 32)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    raw = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "random":
        path.write_bytes(os.urandom(len(raw)))
    elif kind == "magic_only":
        path.write_bytes(b"GGUF")
    return str(path)


GGUFS = [("header", "GGUF"), ("truncated", "truncated or corrupt"), ("random", "not a GGUF file"),
         ("magic_only", "truncated or corrupt")]


@pytest.mark.parametrize(("kind", "says"), GGUFS)
def test_a_corrupt_gguf_is_refused_by_evaluate(refused, texts, tmp_path, kind, says):
    path = _gguf(tmp_path / f"{kind}.gguf", kind)
    refused(lambda: evaluate_main(["--model", path, "--text", texts["text"]]), (path, says), watch=(tmp_path,))


@pytest.mark.parametrize(("kind", "says"), GGUFS[:2])
def test_a_corrupt_gguf_is_refused_by_the_dry_run(job, refused, tmp_path, kind, says):
    path = _gguf(tmp_path / f"{kind}.gguf", kind)
    args = ["--config", job.write(), "--dry-run", "--set", f"model.source={path}"]
    refused(lambda: compress_main(args), (path, says), watch=(job.out, tmp_path / "cache"))


@pytest.mark.parametrize(("source", "says"), [
    ("{tmp}/none", "does not exist"), ("{tmp}/none.gguf", "does not exist"), ("{tmp}", "config.json"),
    ("pypi:nesta-no-such-model-pkg", "nesta-no-such-model-pkg"),
])
def test_a_model_source_that_is_not_there(refused, texts, tmp_path, source, says):
    source = source.format(tmp=tmp_path)
    refused(lambda: evaluate_main(["--model", source, "--text", texts["text"]]), says, watch=(tmp_path,))
