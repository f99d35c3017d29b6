"""ratio: auto picks the largest grid ratio within the perplexity bound, reusing one whitened SVD per linear; its
factors equal a fixed-ratio job's at the chosen ratio."""

from pathlib import Path

import pytest
from safetensors.torch import load_file

from nesta_ray.compress import main as compress_main
from nesta_ray.config.loading import validate
from nesta_ray.config.method_section import AutoRatioConfig
from nesta_ray.errors import ConfigError
from nesta_ray.pipeline.job import run_job

from paths import C4 as CORPUS


def _raw(folder, out, method):
    return {
        "model": {"source": folder},
        "method": method,
        "calibration": {"path": CORPUS, "seq_len": 64, "num_windows": 200, "num_sequences": 32, "micro_batch": 16},
        "evaluation": {"seq_len": 64, "sets": [{"name": "held", "path": CORPUS, "first_window": 200, "num_windows": 4}]},
        "output": {"uri": str(out)},
        "runtime": {"progress": False},
    }


def test_auto_config_grid_and_errors(tmp_path):
    assert AutoRatioConfig(set="s", min_ratio=0.1, max_ratio=0.4, step=0.1).grid() == [0.1, 0.2, 0.3, 0.4]
    with pytest.raises(ConfigError, match="method: ratio: auto needs an auto section"):
        validate(_raw("m", tmp_path, {"ratio": "auto"}))
    with pytest.raises(ConfigError, match="method.auto.set 'c4' must name one of evaluation.sets"):
        validate(_raw("m", tmp_path, {"ratio": "auto", "auto": {"set": "c4"}}))
    with pytest.raises(ConfigError, match="method.ratio: must be a number in \\[0, 1\\) or auto"):
        validate(_raw("m", tmp_path, {"ratio": "half"}))


def _tensors(report):
    out = {}
    for shard in sorted(Path(report["run_uri"]).glob("model-*.safetensors")):
        out.update(load_file(str(shard)))
    return out


@pytest.mark.slow
def test_auto_ratio_walks_the_grid_and_matches_a_fixed_ratio_job(ray_local, smol4_folder, tmp_path, capsys):
    method = {"name": "nsvd1", "ratio": "auto",
              "auto": {"set": "held", "max_increase": 0.25, "min_ratio": 0.05, "max_ratio": 0.4, "step": 0.05}}
    auto = run_job(validate(_raw(smol4_folder, tmp_path / "auto", method)))
    a = auto["auto_ratio"]
    points = {p["ratio"]: p for p in a["points"]}
    chosen = a["ratio"]
    assert points[chosen]["passed"] and points[chosen]["increase"] <= 0.25
    assert all(not p["passed"] for r, p in points.items() if r > chosen)  # bisection: every larger one tried failed
    assert len(points) <= 4  # log2 of an 8-point grid, not a sweep
    assert auto["method"]["ratio"] == chosen and auto["resume"]["computed"] == [0, 1, 2, 3]
    held = auto["perplexity"]["held"]
    assert held["compressed"]["perplexity"] == pytest.approx(points[chosen]["perplexity"], rel=1e-6)

    fixed = run_job(validate(_raw(smol4_folder, tmp_path / "fixed", {"name": "nsvd1", "ratio": chosen})))
    x, y = _tensors(auto), _tensors(fixed)
    assert set(x) == set(y) and all((x[k] == y[k]).all() for k in x)  # reused SVDs give the same factors

    report_md = (Path(auto["run_uri"]) / "report.md").read_text()
    assert "## Automatic ratio" in report_md and f"chose **{chosen}**" in report_md
    assert (Path(auto["run_uri"]) / "report.html").read_text().count("data:image/png;base64,") >= 2

    config = tmp_path / "auto.yaml"
    import json
    config.write_text(json.dumps(_raw(smol4_folder, tmp_path / "never", {**method, "auto": {
        **method["auto"], "max_increase": 1e-9, "min_ratio": 0.3}})))
    assert compress_main(["--config", str(config)]) == 2
    assert "even the smallest ratio 0.3 raises held perplexity by" in capsys.readouterr().err
    print(a)
