"""The time and bytes model of every phase: what the 70B job and night move, from the meta device."""

import pytest

from nesta_ray.config.loading import load_config
from nesta_ray.pipeline.dry_run import job_phase_list, planned
from nesta_ray.plan.sizing import shard_plan
from nesta_ray.plan.timing import Rates, drift_phase

from paths import REPO

RATES = Rates(matmul_gflops=1000.0, svd_gflops=100.0, read_gbps=2.0, write_gbps=1.0)


@pytest.fixture(scope="module")
def llama70b():
    cfg = load_config(str(REPO / "configs" / "llama70b.yaml"), [])
    hf_config, plan = planned(cfg)
    return cfg, hf_config, plan


def test_the_70b_job_costs_every_phase_and_writes_bfloat16_factors(llama70b):
    cfg, hf_config, plan = llama70b
    phases = {p.name: p for p in job_phase_list(cfg, plan, hf_config, RATES)}
    assert list(phases) == ["load weights", "evaluate dense", "calibrate + decompose", "evaluate compressed",
                            "generation + gate cases", "write checkpoint"]
    assert all(p.seconds > 0 for p in phases.values())
    after = plan.model_params - plan.params_before + plan.params_after
    assert phases["load weights"].read_bytes == plan.model_params * 2  # bfloat16, each tensor read once
    assert phases["calibrate + decompose"].written_bytes == plan.params_after * 4  # the stage is float32
    assert phases["write checkpoint"].written_bytes == after * 2  # the checkpoint keeps the source dtype
    slow = {p.name: p for p in job_phase_list(cfg, plan, hf_config, Rates(500.0, 100.0, 2.0, 1.0))}
    assert slow["evaluate dense"].seconds == pytest.approx(2 * phases["evaluate dense"].seconds)


def test_auto_ratio_adds_its_preparation_and_points(llama70b):
    cfg, hf_config, _ = llama70b
    raw = cfg.model_dump(mode="json")
    raw["method"].update(ratio="auto", auto={"set": "heldout", "min_ratio": 0.1, "max_ratio": 0.4, "step": 0.1})
    auto = cfg.model_validate(raw)
    _, plan = planned(auto.with_ratio(0.1))
    names = [p.name for p in job_phase_list(auto, plan, hf_config, RATES)]
    assert names[2:4] == ["auto ratio: prepare", "auto ratio: 3 points"]  # bisection over 4 grid ratios


def test_drift_reads_each_shards_tensors_and_the_published_factors(llama70b):
    cfg, hf_config, plan = llama70b
    shards = shard_plan(cfg, plan, hf_config)
    drift = drift_phase(cfg, shards, 0.0, RATES)
    assert drift.read_bytes == plan.model_params * 2 + plan.params_after * 2
    assert drift.written_bytes == 0 and drift.seconds > max(s.weights_bytes for s in shards) / 2e9


def test_the_70b_plan_with_the_assumed_h100_rates_is_under_30_minutes_and_prints_its_floor(capsys):
    from nesta_ray.compress import main as compress_main

    assert compress_main(["--config", str(REPO / "configs" / "llama70b.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "rates assumed (NVIDIA H100" in out and "| physical floor" in out
    total_h = float(out.split("| total | ")[1].split(" |")[0])
    line = out.split("\nestimate ")[1].split("\n")[0]
    estimate_s = float(line.split("(")[1].split(" s)")[0].replace(",", ""))
    floor_s = float(line.split("a floor of ")[1].split(" s:")[0].replace(",", ""))
    assert total_h * 3600 == pytest.approx(estimate_s, rel=0.01) and estimate_s < 30 * 60
    ratio = float(line.split("s: ")[1].split("x the floor")[0])
    assert 1.0 < ratio == pytest.approx(estimate_s / floor_s, rel=0.01)
    assert f"| floor | {floor_s:,.1f} |" in out


def test_the_gram_factorisation_is_planned_cheaper_than_full_svds(llama70b):
    cfg, hf_config, plan = llama70b
    gram = shard_plan(cfg, plan, hf_config)[0]
    svd = shard_plan(cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"factorization": "svd"})}),
                     plan, hf_config)[0]
    assert gram.decomposition_work["svd"] == 0 and gram.decomposition_work["eigh"] > 0
    assert svd.decomposition_work["svd"] > 0 and gram.decomposition_flops < svd.decomposition_flops
    assert gram.decomposition_work["cholesky"] == pytest.approx(10 * (3 * 8192**3 + 28672**3) / 3)  # one per group
    assert 0 < gram.gram_flops < gram.calibration_flops and gram.copy_bytes > 0


def test_a_rates_file_given_with_the_flag_replaces_the_configs_rates(tmp_path, capsys):
    from nesta_ray.compress import main as compress_main
    from nesta_ray.plan.rates import rates_file

    path = tmp_path / "cpu.json"
    path.write_text(rates_file("CPU twin", {"matmul_gflops": 100.0, "svd_gflops": 1.0}))
    assert compress_main(["--config", str(REPO / "configs" / "llama70b.yaml"), "--dry-run", "--rates",
                          str(path)]) == 0
    out = capsys.readouterr().out
    assert "rates measured (CPU twin; cpu.json)" in out and "assumed" not in out
    total_h = float(out.split("| total | ")[1].split(" |")[0])
    assert total_h > 10  # the plan at a CPU's rates is hours, not minutes
    assert compress_main(["--config", str(REPO / "configs" / "llama70b.yaml"), "--dry-run", "--rates",
                          str(tmp_path / "none.json")]) == 2
    assert "rates file" in capsys.readouterr().err
