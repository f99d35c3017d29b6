"""``method.allocation: sensitivity`` in the job: embedded and 2 layer shards allocate the same ranks and write
identical checkpoints under the uniform parameter count; linears kept dense are dense in the run, which loads; a
rerun takes the staged allocation instead of measuring again; bad combinations are refused."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from nesta_ray.checkpoint.reader import load_compressed
from nesta_ray.config.loading import validate
from nesta_ray.errors import ConfigError, PipelineError
from nesta_ray.model.lowrank_linear import LowRankLinear
from nesta_ray.pipeline.job import run_job

from paths import C4 as CORPUS


def _raw(folder, out, workers, **runtime):
    return {
        "model": {"source": folder},
        "method": {"name": "nsvd1", "ratio": 0.3, "allocation": "sensitivity", "sensitivity_windows": 4},
        "calibration": {"path": CORPUS, "seq_len": 64, "num_windows": 100, "num_sequences": 6, "micro_batch": 2},
        "evaluation": {"seq_len": 64, "sets": [{"name": "held", "path": CORPUS, "first_window": 100, "num_windows": 2}]},
        "output": {"uri": str(out)},
        "runtime": {"workers": workers, "progress": False, **runtime},
    }


def _tensors(report):
    out = {}
    for shard in sorted(Path(report["run_uri"]).glob("model-*.safetensors")):
        out.update(load_file(str(shard)))
    return out


@pytest.fixture(scope="module")
def embedded(ray_local, tiny3_folder, tmp_path_factory):
    return run_job(validate(_raw(tiny3_folder, tmp_path_factory.mktemp("alloc") / "a", 0)))


def test_embedded_and_sharded_allocations_write_identical_checkpoints(embedded, tiny3_folder, tmp_path):
    # shard 0 dies once in the sensitivity pass: restarted without its SVDs, it prepares again and the pass reruns
    sharded = run_job(validate(_raw(tiny3_folder, tmp_path / "b", 2, fail_at_layer=1, fail_phase="sensitivity")))
    assert [s["restarted"] for s in sharded["shards"]] == [True, False]
    a, b = _tensors(embedded), _tensors(sharded)
    assert set(a) == set(b) and all((a[k] == b[k]).all() for k in a)
    untimed = lambda r: {k: v for k, v in r["allocation"].items() if k != "seconds"}  # noqa: E731
    assert untimed(embedded) == untimed(sharded) and set(embedded["allocation"]["seconds"]) == {
        "prepare", "sensitivity", "allocate", "factors"}
    assert embedded["perplexity"]["held"]["compressed"] == sharded["perplexity"]["held"]["compressed"]


def test_the_allocation_spends_the_uniform_budget_unevenly_and_keeps_some_linears_dense(embedded):
    alloc, params = embedded["allocation"], embedded["parameters"]
    assert 0.999 * alloc["budget"] <= alloc["params"] <= alloc["budget"]
    assert params["linears_after"] == alloc["params"]  # factors + the dense-kept linears
    assert alloc["budget"] == pytest.approx(0.7 * params["linears_before"], rel=0.02)  # the uniform plan's, at 30%
    ranks = {m["rank"] for m in embedded["modules"].values()}
    assert alloc["dense"] > 0 and len(ranks) > 3  # not uniform: dense ones and many ranks
    assert alloc["linears"] == alloc["dense"] + len(embedded["modules"])
    run = Path(embedded["run_uri"])
    assert f"## Rank allocation\n\nby measured sensitivity (4 windows): {alloc['dense']} of 21 linears kept dense" in (
        run / "report.md").read_text()
    meta = json.loads((run / "nesta.json").read_text())
    assert set(meta["modules"]) == set(embedded["modules"])
    tensors = _tensors(embedded)
    dense = _dense_names(embedded, tensors)
    assert len(dense) == alloc["dense"]
    for name in dense:  # stored as the source's dense weight, no factors
        assert f"{name}.weight" in tensors and f"{name}.A" not in tensors
    model = load_compressed(str(run))
    for name in dense:
        assert type(model.get_submodule(name)) is nn.Linear
    for name in embedded["modules"]:
        assert isinstance(model.get_submodule(name), LowRankLinear)


def _dense_names(report, tensors):
    """Targeted linears (q/k/v/o/gate/up/down of every layer) with no factors in the run."""
    factored = {k.removesuffix(".A") for k in tensors if k.endswith(".A")}
    linears = {k.removesuffix(".weight") for k in tensors if k.endswith("_proj.weight")}
    assert factored == set(report["modules"])
    return sorted(linears - factored)


def test_a_rerun_takes_the_staged_allocation_and_restages_a_lost_layer(ray_local, embedded, tiny3_folder, tmp_path):
    out = tmp_path / "c"
    # the compressed evaluation (dense evaluation off) kills shard 0 for good: everything is staged by then
    failing = _raw(tiny3_folder, out, 2, fail_at_layer=0, fail_phase="evaluate", fail_times=5)
    failing["evaluation"]["dense"] = False
    with pytest.raises(PipelineError, match="rerun the job to resume"):
        run_job(validate(failing))
    (stage,) = (out / "staging").glob("[0-9a-f]*")
    assert (stage / "allocation.json").exists()
    layers = sorted(stage.glob("layer-*.safetensors"))
    assert len(layers) == 3
    layers[1].unlink()  # lost: the rerun must recompute it at the staged ranks
    rerun_cfg = _raw(tiny3_folder, out, 2)
    rerun_cfg["evaluation"]["dense"] = False
    rerun = run_job(validate(rerun_cfg))
    assert rerun["allocation"]["reused_from_stage"] and rerun["allocation"]["staged_layers"] == [1]
    assert rerun["resume"]["staged_before"] == [0, 2] and rerun["resume"]["computed"] == [1]
    a, b = _tensors(embedded), _tensors(rerun)
    assert set(a) == set(b) and all((a[k] == b[k]).all() for k in a)


def test_dry_run_says_what_the_allocation_costs(tiny3_folder, tmp_path):
    from nesta_ray.pipeline.dry_run import dry_run

    raw = _raw(tiny3_folder, tmp_path, 2)
    out = dry_run(validate(raw))
    assert "rank allocation (sensitivity): the ranks above are the uniform plan's" in out
    assert "first 4 windows" in out and "GiB fp64 host for the largest of 2 shards" in out
    raw["method"]["allocation"] = "uniform"
    assert "rank allocation" not in dry_run(validate(raw))


@pytest.mark.parametrize("change, match", [
    ({"method": {"ratio": "auto", "auto": {"set": "held"}}}, "need a fixed ratio"),
    ({"method": {"name": "svd"}}, "a whitened method"),
    ({"calibration": {"mode": "propagate"}}, "calibration.mode: original"),
    ({"method": {"sensitivity_windows": 7}}, "exceeds calibration.num_sequences"),
    ({"method": {"rank_overrides": {"model.layers.0.self_attn.q_proj": 4}}}, "use one of them"),
])
def test_bad_combinations_are_refused(tiny3_folder, tmp_path, change, match):
    raw = _raw(tiny3_folder, tmp_path, 0)
    for section, values in change.items():
        raw[section] = {**raw[section], **values}
    with pytest.raises(ConfigError, match=match):
        validate(raw)


def test_sensitivity_curves_are_the_same_in_process_and_on_shards(ray_local, tiny3_folder, tmp_path):
    """The measured curves themselves (not only the ranks they lead to) agree bit for bit."""
    from nesta_ray.config.loading import validate as v
    from nesta_ray.io.sources import load_source
    from nesta_ray.pipeline.context import resolve_source
    from nesta_ray.pipeline.runner import InProcessModel
    from nesta_ray.pipeline.shard_group import ShardGroup
    from nesta_ray.pipeline.tasks import Work
    from nesta_ray.plan.linears import plan_for

    cfg = v(_raw(tiny3_folder, tmp_path, 0))
    source = resolve_source(cfg)
    work = Work(plan_for(source.skeleton, cfg), cfg.method.as_method(), 2)
    ids = torch.randint(0, 1000, (6, 32), generator=torch.Generator().manual_seed(0))
    model, _ = load_source(source.model, torch.float32)
    with InProcessModel(model, work) as runner:
        runner.prepare(ids)
        here = runner.sensitivity(ids[:4])
    with ShardGroup(source.model, work, None, 2) as shards:
        shards.prepare(ids)
        there = shards.sensitivity(ids[:4])
    assert set(here) == set(there) == {p.name for p in work.plan.modules}
    assert all((here[k] == there[k]).all() and here[k][0] > 0 for k in here)
