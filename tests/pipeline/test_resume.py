"""Faults for real: a layer shard killed mid-layer is restarted by Ray; a driver killed mid-job resumes on rerun."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from nesta_ray.config.loading import validate
from nesta_ray.pipeline.job import run_job

from paths import C4 as CORPUS
from paths import REPO


def _tensors(run: Path) -> dict:
    out = {}
    for shard in sorted(run.glob("model-*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def _cfg(folder, out, **runtime):
    return validate({
        "model": {"source": folder}, "method": {"name": "nsvd1", "ratio": 0.3},
        "calibration": {"path": CORPUS, "seq_len": 64, "num_windows": 100, "num_sequences": 6, "micro_batch": 2},
        "output": {"uri": str(out)}, "runtime": {"progress": False, **runtime},
    })


def test_a_shard_killed_mid_layer_is_restarted_and_the_output_is_identical(ray_local, tiny3_folder, tmp_path):
    clean = run_job(_cfg(tiny3_folder, tmp_path / "clean", workers=0))
    faulty = run_job(_cfg(tiny3_folder, tmp_path / "faulty", workers=2, fail_at_layer=1))
    # shard 0 (layers 0-1) staged layer 0, died before staging layer 1, was restarted and computed only layer 1
    assert faulty["resume"]["computed"] == [1, 2]
    a, b = _tensors(Path(clean["run_uri"])), _tensors(Path(faulty["run_uri"]))
    assert set(a) == set(b) and all((a[k] == b[k]).all() for k in a)
    assert not (tmp_path / "faulty" / "staging").exists() or not any((tmp_path / "faulty" / "staging").iterdir())


@pytest.mark.slow
def test_a_killed_driver_resumes_without_recomputing_staged_layers(smollm_folder, tmp_path):
    """SIGKILL the CLI once two layers are staged, rerun the same job, compare with an uninterrupted run."""
    sets = ["method.layers=[0,1,2,3,4,5,6,7]", "method.ratio=0.1", "method.allocation=uniform",  # layer by layer "calibration.num_sequences=4",
            "evaluation.sets=[]", "evaluation.prompt=null", "runtime.progress=false", "runtime.num_cpus=2"]

    def cli(out):
        args = [sys.executable, "-m", "nesta_ray.compress", "--config", "configs/smollm2-135m.yaml",
                *[f"--set={s}" for s in sets + [f"output.uri={out}"]]]
        return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "RAY_ADDRESS": ""}, start_new_session=True)

    out = tmp_path / "resumed"
    proc = cli(out)
    deadline = time.time() + 600
    staged: list[Path] = []
    while time.time() < deadline and proc.poll() is None:
        staged = list((out / "staging").glob("*/layer-*.safetensors")) if (out / "staging").exists() else []
        if len(staged) >= 2:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
            break
        time.sleep(0.05)
    proc.wait()
    assert len(staged) >= 2, f"the job ended before two layers were staged: {proc.stderr.read()[-2000:]}"
    assert not (out / "latest").exists()  # nothing was published by the killed run

    rerun = cli(out)
    assert rerun.wait(timeout=900) == 0, rerun.stderr.read()[-3000:]
    run = out / "runs" / (out / "latest").read_text().strip()
    report = json.loads((run / "report.json").read_text())
    skipped = report["resume"]["staged_before"]
    assert len(skipped) >= 2 and set(report["resume"]["computed"]) == set(range(8)) - set(skipped)
    print(f"resumed: {len(skipped)} of 8 layers skipped ({skipped}), {len(report['resume']['computed'])} computed")

    ref = cli(tmp_path / "reference")
    assert ref.wait(timeout=900) == 0, ref.stderr.read()[-3000:]
    ref_run = tmp_path / "reference" / "runs" / (tmp_path / "reference" / "latest").read_text().strip()
    a, b = _tensors(run), _tensors(ref_run)
    assert set(a) == set(b) and all((a[k] == b[k]).all() for k in a)
