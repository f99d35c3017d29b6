"""`ray job submit` against a local cluster started by this test: the job's output equals the embedded run's."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from paths import C4 as CORPUS
from paths import REPO
from ray_head import RAY, head_node

pytestmark = pytest.mark.slow


def _tensors(root: Path) -> dict:
    run = root / "runs" / (root / "latest").read_text().strip()
    out = {}
    for shard in sorted(run.glob("model-*.safetensors")):
        out.update(load_file(str(shard)))
    return out


@pytest.fixture()
def cluster():
    """A head node with its own ports whose job server answers (tests/ray_head.py)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    with head_node(env, num_cpus=2) as node:
        probe = subprocess.run([RAY, "job", "list", "--address", node.dashboard], env=env, capture_output=True)
        assert probe.returncode == 0, probe.stderr[-2000:]
        yield node.dashboard, env


def test_ray_job_submit_matches_the_embedded_run(cluster, tiny3_folder, tmp_path):
    address, env = cluster
    config = {
        "model": {"source": tiny3_folder}, "method": {"name": "nsvd1", "ratio": 0.3},
        "calibration": {"path": CORPUS, "seq_len": 64, "num_windows": 100, "num_sequences": 6, "micro_batch": 2},
        "evaluation": {"dense": False, "sets": []}, "output": {"uri": str(tmp_path / "job")},
        "runtime": {"workers": 2, "progress": False},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    submit = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--", sys.executable, "-m", "nesta_ray.compress",
         "--config", str(path)], env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert submit.returncode == 0 and "succeeded" in submit.stdout.lower(), submit.stdout[-3000:] + submit.stderr[-2000:]

    embedded = subprocess.run(
        [sys.executable, "-m", "nesta_ray.compress", "--config", str(path), "--set", "runtime.workers=0",
         "--set", f"output.uri={tmp_path / 'embedded'}"], env=env, capture_output=True, text=True, timeout=600,
        cwd=REPO)
    assert embedded.returncode == 0, embedded.stderr[-3000:]
    a, b = _tensors(tmp_path / "job"), _tensors(tmp_path / "embedded")
    assert set(a) == set(b) and all((a[k] == b[k]).all() for k in a)
