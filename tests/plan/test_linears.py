"""The plan states the nested split only where the job uses it (k1 is decided in the decomposition)."""

import json
import re

import pytest
import torch

from nesta_ray.compress import main as compress_main
from nesta_ray.config.loading import validate
from nesta_ray.method.ranks import split_rank
from nesta_ray.pipeline.job import run_job
from nesta_ray.plan.linears import plan_for

from paths import C4 as CORPUS


def _raw(folder, out, tolerance):
    return {"model": {"source": folder}, "method": {"name": "nsvd1", "ratio": 0.3, "k1_tolerance": tolerance},
            "calibration": {"path": CORPUS, "seq_len": 64, "num_windows": 100, "num_sequences": 6, "micro_batch": 2},
            "evaluation": {"sets": []}, "output": {"uri": str(out)}, "runtime": {"progress": False}}


@pytest.mark.parametrize("tolerance", [0.02, None])
def test_where_the_plan_states_k1_it_is_the_jobs_k1(ray_local, tiny3_folder, tmp_path, capsys, tolerance):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = validate(_raw(tiny3_folder, tmp_path / "out", tolerance))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny3_folder))
    plan = plan_for(skeleton, cfg)
    report = run_job(cfg)
    for p in plan.modules:
        k1 = report["modules"][p.name]["k1"]
        if p.split is not None:
            assert p.split == (k1, p.rank - k1), p.name
    if tolerance is None:
        assert all(p.split is not None for p in plan.modules)
        return
    assert all(p.split is None and p.residual_svd for p in plan.modules)  # per matrix: the time model bounds it
    # what a plan splitting by k1_fraction would have claimed is not what the job did
    assert any(m["k1"] != split_rank(m["rank"], cfg.method.k1_fraction)[0] for m in report["modules"].values())
    config = tmp_path / "job.yaml"
    config.write_text(json.dumps(_raw(tiny3_folder, tmp_path / "plan", tolerance)))
    capsys.readouterr()
    assert compress_main(["--config", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "per matrix (tolerance 0.02)" in out and not re.search(r"\| \d+\+\d+ \|", out)  # no k1+k2 it does not use
