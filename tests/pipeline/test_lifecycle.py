"""Every lifecycle step on the layer shards computes what the whole model computes in this process: per-window
NLL under dense, staged, published and tried-ratio weights, greedy tokens, the ratio search's factors and drift
errors; and a shard killed mid-evaluation or mid-scoring is restarted with the same numbers."""

import pytest
import torch

from nesta_ray.checkpoint.stage import LayerStage
from nesta_ray.config.loading import validate
from nesta_ray.errors import PipelineError
from nesta_ray.io.sources import ModelSource, load_model
from nesta_ray.method.decompose import Method
from nesta_ray.model.arch import arch_for
from nesta_ray.ops.evaluation import greedy
from nesta_ray.pipeline.context import resolve_source
from nesta_ray.pipeline.drift_scoring import DriftScorer
from nesta_ray.pipeline.faults import Fault
from nesta_ray.pipeline.job import run_job
from nesta_ray.pipeline.runner import InProcessModel
from nesta_ray.pipeline.shard_group import ShardGroup
from nesta_ray.pipeline.shard_weights import DENSE, at_ranks, published, staged
from nesta_ray.pipeline.shard_worker import ShardOptions
from nesta_ray.pipeline.tasks import Work
from nesta_ray.plan.linears import make_plan

from paths import C4 as CORPUS
from tiny import save_tiny_family

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHOD = Method("nsvd1")


@pytest.fixture(scope="module")
def gemma(tmp_path_factory, smollm_folder):
    """A 3-layer random Gemma-3 whose layers mix 8-token sliding and global attention (masks differ by layer)."""
    return save_tiny_family(tmp_path_factory.mktemp("gemma"), smollm_folder, "gemma3_text")


def _ids(n, length=32, seed=0):
    return torch.randint(0, 2000, (n, length), generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return float(((a - b).abs() / b.abs()).max())


@pytest.mark.parametrize("folder_name", ["tiny3_folder", "gemma"])
def test_two_shards_compute_what_the_whole_model_computes(ray_local, request, folder_name, tmp_path):
    folder = request.getfixturevalue(folder_name)
    model, _ = load_model(folder)
    plan = make_plan(model, arch_for(model.config.model_type), method=METHOD, ratio=0.3, targets=TARGETS)
    work, stage = Work(plan, METHOD, micro_batch=2), LayerStage(str(tmp_path), "fp")
    calib, windows, prompt = _ids(4), _ids(5, seed=1), _ids(1, 6, seed=2)
    local = InProcessModel(model, work, stage)
    with ShardGroup(ModelSource(folder, folder), work, stage, 2) as shards:
        assert _rel(shards.window_nll(windows, DENSE), local.window_nll(windows, DENSE)) <= 1e-6
        shards.compress(calib)  # stages every layer; the local model reads the same stage
        for weights in (staged(stage), DENSE, staged(stage)):  # switching back and forth
            assert _rel(shards.window_nll(windows, weights, 2), local.window_nll(windows, weights, 2)) <= 1e-6
        tokens = {name: greedy(lambda s, r=r: r.next_token(s, staged(stage)), prompt, 8, None)
                  for name, r in (("shards", shards), ("local", local))}
        assert tokens["shards"] == tokens["local"] and len(tokens["local"]) == 8
        shards.prepare(calib)
        local.prepare(calib)
        ranks = at_ranks({p.name: max(1, p.rank // 2) for p in plan.modules})
        assert _rel(shards.window_nll(windows, ranks), local.window_nll(windows, ranks)) <= 1e-6


def _job(folder, out, workers, **runtime):
    return validate({
        "model": {"source": folder}, "method": {"name": "nsvd1", "ratio": 0.3},
        "calibration": {"path": CORPUS, "seq_len": 32, "num_windows": 100, "num_sequences": 4, "micro_batch": 2},
        "evaluation": {"seq_len": 32, "sets": [{"name": "held", "path": CORPUS, "first_window": 100,
                                                "num_windows": 3}]},
        "output": {"uri": str(out)}, "runtime": {"workers": workers, "progress": False, **runtime},
    })


def test_drift_errors_on_shards_equal_the_in_process_ones(ray_local, gemma, tmp_path):
    report = run_job(_job(gemma, tmp_path / "out", 0))
    ids = _ids(4, seed=5)
    errors = {}
    for workers in (0, 2):
        cfg = _job(gemma, tmp_path / "out", workers)
        errors[workers], layers = DriftScorer(cfg, resolve_source(cfg)).errors(report["run_uri"], ids)
    assert set(errors[0]) == set(errors[2]) == set(report["modules"]) and set(layers.values()) == {0, 1, 2}
    for name, e in errors[0].items():
        assert errors[2][name] == pytest.approx(e, rel=1e-9), name


def test_a_shard_killed_during_evaluation_is_restarted_with_the_same_numbers(ray_local, tiny3_folder, tmp_path):
    clean = run_job(_job(tiny3_folder, tmp_path / "clean", 2))
    faulty = run_job(_job(tiny3_folder, tmp_path / "faulty", 2, fail_at_layer=2, fail_phase="evaluate"))
    assert faulty["perplexity"] == clean["perplexity"]
    assert [s["restarted"] for s in faulty["shards"]] == [False, True] and not clean["shards"][1]["restarted"]
    assert (tmp_path / "faulty" / "latest").is_file()


def test_a_shard_that_fails_for_good_while_scoring_is_one_pipeline_error(ray_local, tiny3_folder, tmp_path):
    report = run_job(_job(tiny3_folder, tmp_path / "out", 0))
    markers = str(tmp_path / "markers")
    cfg = _job(tiny3_folder, tmp_path / "out", 2)
    source = resolve_source(cfg)
    meta_plan = make_plan(load_model(tiny3_folder)[0], arch_for("llama"), method=METHOD, ratio=0.3, targets=TARGETS)
    once = ShardOptions(fault=Fault("drift", 1, markers, times=1))
    with ShardGroup(source.model, Work(meta_plan, METHOD, 2), None, 2, once) as shards:
        restarted = shards.drift_errors(_ids(4, seed=5), published(report["run_uri"]))
    clean, _ = DriftScorer(cfg, source).errors(report["run_uri"], _ids(4, seed=5))
    assert restarted == pytest.approx(clean, rel=1e-12)
    for_good = ShardOptions(fault=Fault("drift", 1, str(tmp_path / "markers2"), times=5))
    group = ShardGroup(source.model, Work(meta_plan, METHOD, 2), None, 2, for_good)
    with pytest.raises(PipelineError, match=r"a layer shard \(after 2 restarts\) failed") as err, group as shards:
        shards.drift_errors(_ids(4, seed=5), published(report["run_uri"]))
    assert "\n" not in str(err.value)


def _tensors(run_uri):
    from pathlib import Path

    from safetensors.torch import load_file

    out = {}
    for shard in sorted(Path(run_uri).glob("model-*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def test_the_automatic_ratio_on_shards_walks_the_embedded_grid_and_writes_the_fixed_ratio_checkpoint(
        ray_local, tiny3_folder, tmp_path):
    """Even with a shard killed while it evaluates a tried ratio (it comes back without its SVDs and prepares
    again from the same inputs)."""
    auto = {"name": "nsvd1", "ratio": "auto",
            "auto": {"set": "held", "max_increase": 0.02, "min_ratio": 0.1, "max_ratio": 0.4, "step": 0.1}}

    def job(out, workers, method, **runtime):
        raw = _job(tiny3_folder, tmp_path / out, workers, **runtime).model_dump(mode="json")
        return run_job(validate({**raw, "method": {**raw["method"], **method}}))

    sharded = job("sharded", 2, auto, fail_at_layer=2, fail_phase="auto_ratio")
    embedded = job("embedded", 0, auto)
    assert [s["restarted"] for s in sharded["shards"]] == [False, True]  # the shard of layer 2 did die
    chosen = sharded["auto_ratio"]["ratio"]
    assert chosen == embedded["auto_ratio"]["ratio"]
    assert [p["ratio"] for p in sharded["auto_ratio"]["points"]] == [p["ratio"] for p in embedded["auto_ratio"]["points"]]
    for a, b in zip(sharded["auto_ratio"]["points"], embedded["auto_ratio"]["points"]):
        assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-6) and a["passed"] == b["passed"]
    fixed = job("fixed", 2, {"ratio": chosen})
    x, y = _tensors(sharded["run_uri"]), _tensors(fixed["run_uri"])
    assert set(x) == set(y) and all((x[k] == y[k]).all() for k in x)  # the staged factors of the chosen ratio
