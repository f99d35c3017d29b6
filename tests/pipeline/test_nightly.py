"""Nightly recompression on the local S3 server: publish, skip on the same traffic, recompress on Japanese traffic,
publish nothing when the gate fails; drift scores and run pruning."""

import json
import math

import pytest
import torch

from nesta_ray.checkpoint.runs import list_runs
from nesta_ray.config.loading import validate
from nesta_ray.errors import NumericalError
from nesta_ray.io.storage import list_names, read_bytes
from nesta_ray.method.drift import layer_scores, relative_error
from nesta_ray.nightly import main as nightly_main
from nesta_ray.pipeline.nightly import run_night

from logs import upload_day


def test_relative_error_and_layer_scores():
    torch.manual_seed(0)
    W, X = torch.randn(6, 5, dtype=torch.float64), torch.randn(40, 5, dtype=torch.float64)
    G = X.T @ X / 40
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    A, B = U[:, :3] * s[:3], Vh[:3]
    E = W - A @ B
    assert relative_error(W, A, B, G) == pytest.approx(float(torch.trace(E @ G @ E.T) / torch.trace(W @ G @ W.T)))
    assert relative_error(W, U * s, Vh, G) == pytest.approx(0.0, abs=1e-20)
    scores = layer_scores({"a": 0.1, "b": 0.2, "c": 0.3}, {"a": 0.2, "b": 0.8, "c": 0.3}, {"a": 0, "b": 0, "c": 1})
    assert scores[0] == pytest.approx(math.sqrt(2 * 4) - 1) and scores[1] == pytest.approx(0.0)
    with pytest.raises(NumericalError, match="b: exact at compression time"):
        layer_scores({"b": 0.0}, {"b": 0.1}, {"b": 0})


def _cfg(folder, out, opts, **extra):
    raw = {
        "model": {"source": folder},
        "method": {"name": "nsvd1", "ratio": 0.3},
        "calibration": {"logs": {"uri": "s3://logs/prod/", "storage_options": opts}, "seq_len": 64,
                        "num_sequences": 64, "micro_batch": 16},
        "output": {"uri": out, "storage_options": opts},
        "runtime": {"progress": False},
        "nightly": {"drift_threshold": 0.5, "sample_sequences": 32, "keep_runs": 2},
    }
    raw.update(extra)
    return raw


@pytest.mark.slow
def test_nights_over_request_logs_on_s3(ray_local, smol4_folder, s3_server, tmp_path, capsys):
    out = s3_server.make_bucket("nightly-out") + "/smol"
    s3_server.make_bucket("logs")
    opts = s3_server.storage_options

    upload_day(opts, "logs/prod", "day1", "en_web_c4_owt", 0)
    first = run_night(validate(_cfg(smol4_folder, out, opts)))
    assert first["decision"] == "recompress" and first["published"] and first["reason"] == "no published run yet"

    upload_day(opts, "logs/prod", "day2", "en_web_c4_owt", 300_000)
    second = run_night(validate(_cfg(smol4_folder, out, opts)))  # reads only day2: since = the first night
    assert second["decision"] == "skip", second
    assert second["drift"]["max"] <= 0.5 and len(second["drift"]["layers"]) == 4
    assert second["baseline_source"].startswith("held-out windows") and first["baseline"]["tokens"] == 32 * 64

    upload_day(opts, "logs/prod", "day3", "ja_manpages", 0)
    third = run_night(validate(_cfg(smol4_folder, out, opts)))
    assert third["decision"] == "recompress" and third["drift"]["max"] > 0.5 and third["published"]
    assert read_bytes(f"{out}/latest", opts).decode().strip() == third["run_id"]
    report = json.loads(read_bytes(f"{out}/runs/{third['run_id']}/report.json", opts))
    assert report["log_selection"]["languages_after"].get("ja") and sum(report["log_selection"]["malformed"].values()) == 1

    upload_day(opts, "logs/prod", "day4", "en_wikipedia", 0)
    cases = tmp_path / "cases.jsonl"
    cases.write_text(json.dumps({"name": "never", "prompt": "The", "expect": "§never§"}) + "\n")
    config = tmp_path / "night4.yaml"
    config.write_text(json.dumps(_cfg(smol4_folder, out, opts, gate={"cases": str(cases), "max_new_tokens": 4})))
    assert nightly_main(["--config", str(config)]) == 3
    fourth = json.loads(capsys.readouterr().out)
    assert fourth["decision"] == "recompress" and fourth["published"] is False and "never" in fourth["gate"]
    assert read_bytes(f"{out}/latest", opts).decode().strip() == third["run_id"]  # nothing published

    runs = list_runs(out, opts)
    assert len(runs) == 2 and third["run_id"] in runs and fourth["run_id"] in runs  # keep_runs=2, oldest pruned
    assert fourth["removed_runs"] == [first["run_id"]]
    nights = list_names(f"{out}/nights", opts)
    assert len([n for n in nights if n.endswith(".json")]) == 4 and nights == sorted(nights)
    pages = [n for n in nights if n.endswith(".html")]
    assert len(pages) == 4  # one per night, on the published run's report
    page = read_bytes(f"{out}/nights/{pages[-1]}", opts).decode()
    assert page.count("data:image/png;base64,") >= 2 and "Drift per layer" in page
    print({"second": second["drift"], "third": third["drift"], "fourth": fourth["drift"]})
