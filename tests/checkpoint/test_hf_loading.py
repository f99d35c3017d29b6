"""A run loads the ordinary Hugging Face way, and only correctly: with nesta_ray imported (registered Auto classes),
without nesta_ray (trust_remote_code and the modeling files the run carries), never through stock classes; and
save_pretrained writes the low-rank format again. Each loading path runs in its own subprocess."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import nesta_ray
from nesta_ray.checkpoint import layout
from nesta_ray.model import lowrank_linear, modeling_nesta_lowrank
from nesta_ray.model.lowrank_linear import LowRankLinear

from tiny import write_tiny_run

# Runs with nesta_ray NOT importable: `python -I -S` skips PYTHONPATH and the site-packages' .pth files (nesta_ray's
# editable install is one); the interpreter's site-packages are put back on sys.path by hand.
WITHOUT_NESTA = r'''
import json, os, sys
run, out, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path[:0] = sys.argv[4:]
try:
    import nesta_ray
    sys.exit("nesta_ray is importable: this process proves nothing")
except ImportError:
    pass
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(threads)
refused = {}
for name, cls in (("auto", AutoModelForCausalLM), ("llama", transformers.LlamaForCausalLM)):
    try:
        cls.from_pretrained(run)
        refused[name] = None
    except Exception as err:
        refused[name] = f"{type(err).__name__}: {err}"
tok = AutoTokenizer.from_pretrained(run, trust_remote_code=True)
ids = tok("The capital of France is", return_tensors="pt").input_ids
model = AutoModelForCausalLM.from_pretrained(run, trust_remote_code=True).eval()
saved = os.path.join(out, "saved")
model.save_pretrained(saved)
again = AutoModelForCausalLM.from_pretrained(saved, trust_remote_code=True).eval()
with torch.no_grad():
    logits, logits_saved = model(input_ids=ids).logits, again(input_ids=ids).logits
    dense = model.to_dense()
    logits_dense = dense(input_ids=ids).logits
torch.save({"ids": ids, "logits": logits, "saved": logits_saved, "dense": logits_dense}, os.path.join(out, "t.pt"))
json.dump({"refused": refused, "class": type(model).__module__, "dense_class": type(dense).__name__,
           "saved_files": sorted(os.listdir(saved))}, open(os.path.join(out, "r.json"), "w"))
'''

WITH_NESTA = r'''
import json, os, sys
run, out, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
import nesta_ray
cheap = not {"torch", "transformers"} & set(sys.modules)
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(threads)
tok = AutoTokenizer.from_pretrained(run)
ids = tok("The capital of France is", return_tensors="pt").input_ids
model = AutoModelForCausalLM.from_pretrained(run).eval()
saved = os.path.join(out, "saved")
model.save_pretrained(saved)
again = AutoModelForCausalLM.from_pretrained(saved).eval()
with torch.no_grad():
    logits, logits_saved = model(input_ids=ids).logits, again(input_ids=ids).logits
torch.save({"ids": ids, "logits": logits, "saved": logits_saved}, os.path.join(out, "t.pt"))
json.dump({"cheap_import": cheap, "class": type(model).__module__, "saved_files": sorted(os.listdir(saved))},
          open(os.path.join(out, "r.json"), "w"))
'''


@pytest.fixture(scope="module")
def run(tiny_folder, tmp_path_factory):
    """A committed run of the tiny model (plain SVD at 25%), written as the job writes it."""
    return write_tiny_run(str(tmp_path_factory.mktemp("hf") / "out"), tiny_folder)


def _child(script: str, run: str, out: Path, *args: str, isolated: bool) -> tuple[dict, dict]:
    out.mkdir()
    flags = ["-I", "-S"] if isolated else []
    env = {**os.environ, "HF_HOME": str(out / "hf"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, *flags, "-c", script, run, str(out), str(torch.get_num_threads()), *args],
                          env=env, cwd=out, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "r.json").read_text()), torch.load(out / "t.pt")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_without_nesta_ray_stock_loading_refuses_and_trust_remote_code_loads_equal(run, tmp_path):
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    report, t = _child(WITHOUT_NESTA, run, tmp_path / "child", *site, isolated=True)
    refused = report["refused"]
    assert refused["auto"].startswith("ValueError") and "trust_remote_code=True" in refused["auto"]
    # an explicit stock class finds no weights under its names (transformers' own message; it cannot name the fix)
    assert refused["llama"].startswith("OSError") and "no file named model.safetensors" in refused["llama"]
    assert report["class"].startswith("transformers_modules.")  # the run's own modeling file, not nesta_ray
    expected = _logits(nesta_ray.load_compressed(run), t["ids"])
    torch.testing.assert_close(t["logits"], expected, rtol=0, atol=0)
    torch.testing.assert_close(t["saved"], expected, rtol=0, atol=0)
    assert {"config.json", "modeling_nesta_lowrank.py", "lowrank_linear.py",
            "model.nesta_lowrank.safetensors"} <= set(report["saved_files"])
    assert not {"model.safetensors", "model.safetensors.index.json"} & set(report["saved_files"])
    assert report["dense_class"] == "LlamaForCausalLM"
    torch.testing.assert_close(t["dense"], expected, rtol=1e-4, atol=1e-4)


def test_import_nesta_ray_registers_the_auto_classes_and_save_pretrained_keeps_the_format(run, tmp_path):
    report, t = _child(WITH_NESTA, run, tmp_path / "child", isolated=False)
    assert report["cheap_import"], "import nesta_ray must not import torch or transformers"
    assert report["class"] == "nesta_ray.model.modeling_nesta_lowrank"
    expected = _logits(nesta_ray.load_compressed(run), t["ids"])
    torch.testing.assert_close(t["logits"], expected, rtol=0, atol=0)
    torch.testing.assert_close(t["saved"], expected, rtol=0, atol=0)
    saved = tmp_path / "child" / "saved"
    config = json.loads((saved / "config.json").read_text())
    assert config["model_type"] == "nesta_lowrank" and config["lowrank_ranks"] == json.loads(
        (Path(run) / "config.json").read_text())["lowrank_ranks"]
    tensors = load_file(str(saved / "model.nesta_lowrank.safetensors"))
    assert "model.layers.0.self_attn.q_proj.A" in tensors and "model.layers.0.self_attn.q_proj.weight" not in tensors
    stored = sum(load_file(str(p))[k].numel() for p in Path(run).glob("model-*.safetensors") for k in load_file(str(p)))
    assert sum(v.numel() for v in tensors.values()) == stored  # the low-rank size, not the dense one


def test_a_run_carries_the_modeling_files_verbatim_and_names_its_own_architecture(run, tiny_folder):
    folder = Path(run)
    manifest = json.loads((folder / "manifest.json").read_text())
    for module in (modeling_nesta_lowrank, lowrank_linear):
        name = Path(module.__file__).name
        assert name in layout.CODE_FILES and name in manifest["files"]
        assert (folder / name).read_bytes() == Path(module.__file__).read_bytes()
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == layout.MODEL_TYPE == modeling_nesta_lowrank.MODEL_TYPE
    assert config["architectures"] == ["NestaLowRankForCausalLM"] and config["auto_map"] == layout.AUTO_MAP
    assert config["text_config"] == json.loads((Path(tiny_folder) / "config.json").read_text())  # verbatim
    assert layout.WEIGHTS_VARIANT == modeling_nesta_lowrank.WEIGHTS_VARIANT and (folder / layout.INDEX).is_file()
    assert not (folder / "model.safetensors.index.json").exists() and not (folder / "model.safetensors").exists()


def test_from_pretrained_refuses_a_checkpoint_with_a_missing_or_extra_tensor(run, tmp_path):
    from transformers import AutoModelForCausalLM

    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    index = json.loads((broken / layout.INDEX).read_text())
    shard = index["weight_map"].pop("model.layers.1.mlp.down_proj.A")
    tensors = load_file(str(broken / shard))
    del tensors["model.layers.1.mlp.down_proj.A"]
    save_file(tensors, str(broken / shard), metadata={"format": "pt"})
    (broken / layout.INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"missing_keys.*down_proj\.A"):
        AutoModelForCausalLM.from_pretrained(broken)


def test_loaded_factors_are_contiguous_and_the_forward_is_two_plain_linears(run):
    model = nesta_ray.load_compressed(run)
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(q, LowRankLinear) and q.A.is_contiguous() and q.B.is_contiguous()
    x = torch.randn(3, 5, q.in_features)
    with torch.no_grad():
        torch.testing.assert_close(q(x), (x @ q.B.T) @ q.A.T, rtol=0, atol=1e-6)
