"""The whole job (run_job) on a tiny model: embedded and 2 layer shards write identical checkpoints; the plan CLI."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from nesta_ray.compress import main as compress_main
from nesta_ray.config.loading import validate
from nesta_ray.pipeline.job import run_job

from paths import C4 as CORPUS
from paths import REPO


def _cfg(folder, out, workers, mode="original"):
    return validate({
        "model": {"source": folder},
        "method": {"name": "nsvd1", "ratio": 0.3},
        "calibration": {"path": CORPUS, "seq_len": 64, "num_windows": 100, "num_sequences": 6, "micro_batch": 2,
                        "mode": mode},
        "evaluation": {"seq_len": 64, "sets": [{"name": "held", "path": CORPUS, "first_window": 100, "num_windows": 2}]},
        "output": {"uri": str(out)},
        "runtime": {"workers": workers, "progress": False},
    })


def _tensors(report):
    run = Path(report["run_uri"])
    out = {}
    for shard in sorted(run.glob("model-*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def test_embedded_and_sharded_jobs_write_identical_checkpoints(ray_local, tiny3_folder, tmp_path):
    embedded = run_job(_cfg(tiny3_folder, tmp_path / "a", workers=0))
    sharded = run_job(_cfg(tiny3_folder, tmp_path / "b", workers=2))
    a, b = _tensors(embedded), _tensors(sharded)
    assert set(a) == set(b) and "model.layers.2.mlp.down_proj.A" in a
    assert all((a[k] == b[k]).all() for k in a)
    assert embedded["perplexity"]["held"]["compressed"] == sharded["perplexity"]["held"]["compressed"]
    assert (tmp_path / "b" / "latest").read_text().strip() == sharded["run_id"]


def test_k1_tolerance_picks_k1_per_matrix_identically_embedded_and_sharded(ray_local, tiny3_folder, tmp_path):
    def cfg(out, workers):
        raw = _cfg(tiny3_folder, out, workers).model_dump(mode="json")
        raw["method"]["k1_tolerance"] = 0.5
        raw["evaluation"]["sets"] = []
        return validate(raw)

    embedded, sharded = run_job(cfg(tmp_path / "a", 0)), run_job(cfg(tmp_path / "b", 2))
    a, b = _tensors(embedded), _tensors(sharded)
    assert set(a) == set(b) and all((a[k] == b[k]).all() for k in a)
    k1s = {m["k1"] / m["rank"] for m in embedded["modules"].values()}
    assert len(k1s) > 3 and min(k1s) < 0.95  # chosen per matrix, not one global fraction
    meta = json.loads((Path(embedded["run_uri"]) / "nesta.json").read_text())
    assert meta["k1_tolerance"] == 0.5


def test_anchored_job_writes_identical_checkpoints_embedded_and_sharded(ray_local, tiny3_folder, tmp_path):
    def cfg(out, workers, **method):
        raw = _cfg(tiny3_folder, out, workers, mode="propagate").model_dump(mode="json")
        raw["method"].update(method)  # anchored ≠ propagate is tested in test_embedded.py
        raw["evaluation"]["sets"] = []
        return validate(raw)

    embedded = run_job(cfg(tmp_path / "a", 0, anchored=True))
    sharded = run_job(cfg(tmp_path / "b", 2, anchored=True))
    a, b = _tensors(embedded), _tensors(sharded)
    assert set(a) == set(b) and "model.layers.2.mlp.down_proj.A" in a
    assert all((a[k] == b[k]).all() for k in a)
    meta = json.loads((Path(embedded["run_uri"]) / "nesta.json").read_text())
    assert (meta["anchored"], meta["anchor"]) == (True, "regression")


def test_anchored_needs_propagate_mode_and_a_whitened_method(tiny3_folder, tmp_path):
    from nesta_ray.errors import ConfigError

    raw = _cfg(tiny3_folder, tmp_path, 0).model_dump(mode="json")
    raw["method"]["anchored"] = True
    with pytest.raises(ConfigError, match="calibration.mode: propagate"):
        validate(raw)
    raw["calibration"]["mode"] = "propagate"
    raw["method"]["name"] = "svd"
    with pytest.raises(ConfigError, match="whitened method"):
        validate(raw)
    raw["method"].update(name="asvd1", anchor="both")
    with pytest.raises(ConfigError, match="anchor"):
        validate(raw)


def test_dry_run_says_what_the_anchored_fit_costs(tiny3_folder, tmp_path):
    from nesta_ray.pipeline.dry_run import dry_run

    raw = _cfg(tiny3_folder, tmp_path, 0, mode="propagate").model_dump(mode="json")
    assert "anchored fit" not in dry_run(validate(raw))
    raw["method"]["anchored"] = True
    out = dry_run(validate(raw))
    assert "anchored fit (regression): a second, dense stream of hidden states (+0.000 GiB" in out
    assert "3 passes per layer" in out and "cross-Gram" in out and "(2, b, t, d)" in out


def test_llama70b_dry_run_plans_eight_actors_from_the_meta_device(capsys):
    assert compress_main(["--config", str(REPO / "configs" / "llama70b.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "70,553,706,496 parameters" in out and "560 linears in 80 layers" in out
    assert "| 7 | 70-79 |" in out and "fits: every actor" in out
    for phase in ("load weights", "evaluate dense", "calibrate + decompose", "evaluate compressed",
                  "generation + gate cases", "write checkpoint", "total"):
        assert f"| {phase} |" in out, phase


def test_llama70b_night_dry_run_costs_a_skip_and_a_recompress_night(capsys):
    from nesta_ray.nightly import main as nightly_main

    assert nightly_main(["--config", str(REPO / "configs" / "llama70b.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    skip, recompress = out.split("a night that skips:")[1].split("a night that recompresses:")
    assert "| score drift |" in skip and "| calibrate + decompose |" not in skip
    assert recompress.count("| score drift |") == 1 and "| held-out baseline of the new run |" in recompress
    assert "| write checkpoint |" in recompress and "on 8 layer shards" in out


def test_a_job_that_cannot_fit_is_refused_before_any_work(capsys):
    code = compress_main(["--config", str(REPO / "configs" / "llama70b.yaml"), "--dry-run",
                          "--set", "runtime.host_memory_gb=64"])
    err = capsys.readouterr().err
    assert code == 2 and "actor 0 (layers 0-9) needs" in err and "host memory" in err and "raise runtime.workers" in err
    code = compress_main(["--config", str(REPO / "configs" / "llama70b.yaml"), "--dry-run",
                          "--set", "runtime.device_memory_gb=4"])
    err = capsys.readouterr().err
    assert code == 2 and "device memory" in err and "raise runtime.workers" not in err


def test_export_dense_and_the_evaluate_cli_on_both_outputs(ray_local, tiny3_folder, tmp_path, capsys):
    from nesta_ray.evaluate import main as evaluate_main

    cfg = _cfg(tiny3_folder, tmp_path / "o", workers=0)
    report = run_job(cfg.model_copy(update={"output": cfg.output.model_copy(update={"export_dense": True})}))
    run = Path(report["run_uri"])
    assert (run / "dense" / "config.json").is_file() and (run / "dense" / "model.safetensors").is_file()
    capsys.readouterr()
    out_json = tmp_path / "eval.json"
    assert evaluate_main(["--model", str(tmp_path / "o"), "--text", CORPUS, "--seq-len", "64",
                          "--max-windows", "2", "--json", str(out_json)]) == 0
    compressed = json.loads(out_json.read_text())["results"][0]["perplexity"]
    assert evaluate_main(["--model", str(run / "dense"), "--text", CORPUS, "--seq-len", "64",
                          "--max-windows", "2", "--json", str(out_json)]) == 0
    dense_export = json.loads(out_json.read_text())["results"][0]["perplexity"]
    assert compressed == pytest.approx(dense_export, rel=1e-4)
    assert "| " + CORPUS in capsys.readouterr().out
    assert evaluate_main(["--model", str(tmp_path / "missing"), "--text", CORPUS]) == 2


def test_a_model_folder_on_s3_is_fetched_once_and_loads(tiny3_folder, s3_server, tmp_path):
    import fsspec

    from nesta_ray.io.sources import load_model, resolve_model

    s3_server.make_bucket("models")
    fs = fsspec.filesystem("s3", **s3_server.storage_options)
    fs.put(tiny3_folder + "/", "models/tiny3/", recursive=True)
    local = resolve_model("s3://models/tiny3", str(tmp_path / "cache"), s3_server.storage_options)
    model, tok = load_model(local)
    assert model.config.num_hidden_layers == 3 and tok("hi").input_ids
    assert resolve_model("s3://models/tiny3", str(tmp_path / "cache"), s3_server.storage_options) == local


@pytest.mark.slow
def test_llama70b_structural_twin_through_s3(ray_local, smollm_folder, s3_server, tmp_path, monkeypatch):
    """The 70B config's code path on an 80-layer, GQA 8:1, untied twin: sharded source and output on S3."""
    import fsspec
    import torch

    import nesta_ray

    from tiny import save_llama70b_twin

    monkeypatch.setenv("NESTA_RAY_CACHE", str(tmp_path / "cache"))
    local = save_llama70b_twin(tmp_path / "twin", smollm_folder)
    for bucket in ("twin-models", "twin-out"):
        s3_server.make_bucket(bucket)
    fs = fsspec.filesystem("s3", **s3_server.storage_options)
    fs.put(local + "/", "twin-models/llama70b-twin/", recursive=True)
    assert len([f for f in fs.ls("twin-models/llama70b-twin") if f.endswith(".safetensors")]) > 1  # sharded source
    opts = s3_server.storage_options
    cfg = validate({
        "model": {"source": "s3://twin-models/llama70b-twin", "storage_options": opts},
        "method": {"name": "nsvd1", "ratio": 0.2},
        "calibration": {"path": CORPUS, "seq_len": 64, "num_windows": 100, "num_sequences": 4, "micro_batch": 2},
        "evaluation": {"dense": False, "sets": []},
        "output": {"uri": "s3://twin-out/llama70b-twin", "storage_options": opts},
        "runtime": {"workers": 2, "progress": False},
    })
    report = run_job(cfg)
    assert len(report["modules"]) == 560 and report["resume"]["computed"] == list(range(80))
    model = nesta_ray.load_compressed("s3://twin-out/llama70b-twin", opts)
    k = model.get_submodule("model.layers.79.self_attn.k_proj")
    assert (k.out_features, k.in_features) == (8, 64) and k.rank == 5  # GQA: 1 KV head of 8 dims
    ids = torch.randint(0, 49152, (1, 16))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_skipped_json_lines_of_the_calibration_text_are_reported(ray_local, tiny3_folder, tmp_path):
    import json as _json

    rows = [_json.dumps({"text": line}) for line in Path(CORPUS).read_text().split("\n\n")[:400]]
    rows[5:5] = ["{not json", _json.dumps({"body": "no text field"}), "{broken"]
    calibration = tmp_path / "calibration.jsonl"
    calibration.write_text("\n".join(rows) + "\n")
    raw = _cfg(tiny3_folder, tmp_path / "out", workers=0).model_dump(mode="json")
    raw["calibration"].update(path=str(calibration), text_field="text")
    raw["evaluation"]["sets"] = []
    report = run_job(validate(raw))
    assert report["skipped_records"] == {str(calibration): {"invalid json": 2, "no 'text' field": 1}}
    assert "## Records skipped while reading text" in (Path(report["run_uri"]) / "report.md").read_text()


def test_shards_read_only_their_own_tensors_of_a_model_on_s3(ray_local, smollm_folder, s3_server, tmp_path,
                                                              monkeypatch):
    """A sharded source on moto's S3: each shard fetches the safetensors headers and the byte ranges of its own
    tensors (never a copy of the model), the cache holds no weights, and the factors equal a local source's."""
    import fsspec

    from nesta_ray.io.weights import WeightStore

    from tiny import save_llama70b_twin

    monkeypatch.setenv("NESTA_RAY_CACHE", str(tmp_path / "cache"))
    local = save_llama70b_twin(tmp_path / "twin", smollm_folder, layers=8)
    s3_server.make_bucket("ranged")
    fsspec.filesystem("s3", **s3_server.storage_options).put(local + "/", "ranged/twin/", recursive=True)

    def cfg(source, out, opts=None):
        return validate({
            "model": {"source": source, "storage_options": opts or {}}, "method": {"name": "nsvd1", "ratio": 0.3},
            "calibration": {"path": CORPUS, "seq_len": 32, "num_windows": 100, "num_sequences": 4, "micro_batch": 2},
            "evaluation": {"seq_len": 32, "sets": [{"name": "held", "path": CORPUS, "first_window": 100,
                                                    "num_windows": 2}]},
            "output": {"uri": str(out)}, "runtime": {"workers": 2, "progress": False},
        })

    remote = run_job(cfg("s3://ranged/twin", tmp_path / "a", s3_server.storage_options))
    store = WeightStore(local)
    headers = sum(8 + len(h) for h in store.headers.values()) + (Path(local) / "model.safetensors.index.json").stat().st_size
    total = sum(e.nbytes for e in store.entries.values())
    for k, shard in enumerate(remote["shards"]):
        prefixes = [f"model.layers.{i}." for i in shard["layers"]]
        prefixes += ["model.embed_tokens."] if k == 0 else ["model.norm.", "lm_head."]
        own = sum(e.nbytes for key, e in store.entries.items() if key.startswith(tuple(prefixes)))
        assert own <= shard["bytes_read"] <= own + headers, (k, shard["bytes_read"], own)
        assert shard["bytes_read"] < 0.7 * total  # its half of the model, not the model
    assert not list((tmp_path / "cache").rglob("*.safetensors"))  # nothing copied whole into the cache
    copy = run_job(cfg(local, tmp_path / "b"))
    a, b = _tensors(remote), _tensors(copy)
    assert set(a) == set(b) and all((a[k] == b[k]).all() for k in a)
    assert remote["perplexity"] == copy["perplexity"]


@pytest.mark.slow
def test_smollm2_on_two_shards_prints_the_embedded_before_after_table(ray_local, smollm_folder, tmp_path):
    """The real SmolLM2-135M: 2 layer shards give the embedded job's before/after table, generation and gate."""
    from nesta_ray.report.markdown import before_after_table

    from paths import corpus

    cases = tmp_path / "cases.jsonl"
    cases.write_text(json.dumps({"name": "paris", "prompt": "The capital of France is", "expect": "Paris"}) + "\n")

    def cfg(workers):
        return validate({
            "model": {"source": smollm_folder}, "method": {"name": "nsvd1", "ratio": 0.1},
            "calibration": {"path": CORPUS, "seq_len": 128, "num_windows": 200, "num_sequences": 8,
                            "micro_batch": 4},
            "evaluation": {"seq_len": 128, "batch_size": 2, "prompt": "The capital of France is", "sets": [
                {"name": "c4_heldout", "path": CORPUS, "first_window": 200, "num_windows": 3},
                {"name": "en_wikipedia", "path": corpus("en_wikipedia"), "num_windows": 3}]},
            "gate": {"max_increase": {"c4_heldout": 5.0}, "cases": str(cases), "max_new_tokens": 4},
            "output": {"uri": str(tmp_path / f"out{workers}")}, "runtime": {"workers": workers, "progress": False},
        })

    embedded, sharded = run_job(cfg(0)), run_job(cfg(2))
    assert before_after_table(sharded["perplexity"]) == before_after_table(embedded["perplexity"])
    for name, entry in embedded["perplexity"].items():
        for kind in ("dense", "compressed"):
            assert sharded["perplexity"][name][kind]["perplexity"] == pytest.approx(entry[kind]["perplexity"],
                                                                                   rel=1e-6), (name, kind)
    assert sharded["generation"] == embedded["generation"] and sharded["gate_summary"] == embedded["gate_summary"]
    assert [s["layers"] for s in sharded["shards"]] == [list(range(15)), list(range(15, 30))]
    print(before_after_table(sharded["perplexity"]))
