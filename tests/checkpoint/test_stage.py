"""The per-layer stage: exact round trips, corrupt objects, and a fingerprint that covers every module that can
change a factor."""

import shutil
from pathlib import Path

import pytest
import torch

from nesta_ray.checkpoint.stage import LayerStage, code_version
from nesta_ray.errors import CheckpointError
from nesta_ray.io.storage import join, put_object
from nesta_ray.method.decompose import Factors

PACKAGE = Path(__file__).resolve().parents[2] / "nesta_ray"


def _factors(seed: int) -> Factors:
    g = torch.Generator().manual_seed(seed)
    return Factors(torch.randn(6, 3, generator=g), torch.randn(3, 5, generator=g), k1=2, k2=1, loss=0.25,
                   relative_loss=0.01, fallbacks={"damping_escalations": 1}, seconds=0.5)


def test_a_staged_layer_comes_back_exactly(tmp_path):
    stage = LayerStage(str(tmp_path), "fp")
    layer = {"model.layers.3.mlp.up_proj": _factors(0), "model.layers.3.mlp.gate_proj": _factors(1)}
    stage.put(3, layer)
    put_object(join(stage.uri, "fault-injected-3"), b"")  # other objects in a stage are not layers
    assert stage.done() == {3}
    back = stage.get(3)
    assert set(back) == set(layer)
    for name, f in layer.items():
        assert torch.equal(back[name].A, f.A) and torch.equal(back[name].B, f.B)
        assert back[name].stats() == f.stats()
    stage.clear()
    assert stage.done() == set()


def test_a_corrupt_stage_object_is_refused_naming_it(tmp_path):
    stage = LayerStage(str(tmp_path), "fp")
    stage.put(0, {"x": _factors(0)})
    path = Path(stage.uri) / "layer-00000.safetensors"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="layer-00000.safetensors is corrupt"):
        stage.get(0)


@pytest.mark.parametrize("module", ["model/calibration.py", "model/layers.py", "pipeline/shard_worker.py",
                                    "pipeline/backends.py", "pipeline/embedded.py", "method/decompose.py"])
def test_the_fingerprint_changes_with_any_code_that_computes_factors(tmp_path, module):
    """The Gram sums the shards use, the layer forward and the backends are covered, not only the math modules:
    a change there must stage elsewhere instead of resuming from factors the old code computed."""
    copy = tmp_path / "nesta_ray"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = code_version(copy)
    assert before == code_version(PACKAGE)
    with open(copy / module, "a") as f:
        f.write("\n# a changed line\n")
    assert code_version(copy) != before
