"""`ray job submit` against a local cluster started by this test: the job's output equals the embedded run's."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from paths import C4 as CORPUS
from paths import REPO

RAY = str(Path(sys.executable).with_name("ray"))

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tensors(root: Path) -> dict:
    run = root / "runs" / (root / "latest").read_text().strip()
    out = {}
    for shard in sorted(run.glob("model-*.safetensors")):
        out.update(load_file(str(shard)))
    return out


@pytest.fixture()
def cluster(tmp_path):
    """A head node on 127.0.0.1 (its own ports and temp dir), stopped by signalling only its own process group."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    dashboard = _free_port()
    temp = Path("/tmp") / f"nr-{os.getpid()}-{dashboard}"  # short: Ray's socket paths have a length limit
    head = subprocess.Popen(
        # Every port its own: another Ray on this machine (the suite's ray_local) holds the default agent ports.
        [RAY, "start", "--head", "--block", "--num-cpus", "2", "--port", str(_free_port()),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--temp-dir", str(temp),
         "--include-dashboard", "true", "--dashboard-agent-listen-port", str(_free_port()),
         "--dashboard-agent-grpc-port", str(_free_port()), "--runtime-env-agent-port", str(_free_port()),
         "--metrics-export-port", str(_free_port())],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 90
    while time.time() < deadline:
        probe = subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True)
        if probe.returncode == 0:
            break
        assert head.poll() is None, head.stdout.read()[-3000:]
        time.sleep(1)
    else:
        pytest.fail("the head node's job server did not come up within 90 s")
    yield address, env
    os.killpg(head.pid, signal.SIGTERM)
    head.wait(timeout=60)
    shutil.rmtree(temp, ignore_errors=True)


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
