"""The whole nightly loop on the 80-layer structural twin of Llama-3-70B through moto's S3 with 4 layer shards:
publish, skip on same-domain traffic, recompress on new-language traffic, a failing gate that publishes nothing;
every number equal to the embedded path (the whole model in one process) on the same twin and traffic."""

import json

import pytest

from nesta_ray.config.loading import validate
from nesta_ray.io.storage import read_bytes
from nesta_ray.pipeline.nightly import run_night

from logs import upload_day
from paths import C4
from tiny import save_llama70b_twin

# Night 4 brings English back to a run calibrated on Japanese (drift again), and its gate fails.
DAYS = [("day1", "en_web_c4_owt", 0), ("day2", "en_web_c4_owt", 300_000), ("day3", "ja_manpages", 0),
        ("day4", "en_web_c4_owt", 600_000)]


def _cfg(s3, out, workers, gate=None):
    opts = s3.storage_options
    return validate({
        "model": {"source": "s3://twin-night/model", "storage_options": opts},
        "method": {"name": "nsvd1", "ratio": "auto",
                   "auto": {"set": "held", "max_increase": 0.02, "min_ratio": 0.1, "max_ratio": 0.4, "step": 0.1}},
        "calibration": {"logs": {"uri": f"s3://twin-night/logs/{workers}/", "storage_options": opts},
                        "seq_len": 32, "num_sequences": 16, "micro_batch": 8},
        "evaluation": {"seq_len": 32, "batch_size": 2,
                       "sets": [{"name": "held", "path": C4, "first_window": 500, "num_windows": 4}]},
        "gate": gate or {"max_increase": {"held": 0.05}},
        "output": {"uri": out, "storage_options": opts},
        "runtime": {"workers": workers, "progress": False},
        "nightly": {"drift_threshold": 0.2, "sample_sequences": 8, "keep_runs": 2},  # random twin: small drifts
    })


def _nights(s3, workers, tmp_path):
    out = f"s3://twin-night/out-{workers}"
    cases = tmp_path / "never.jsonl"
    cases.write_text(json.dumps({"name": "never", "prompt": "The", "expect": "§never§"}) + "\n")
    records, reports = [], []
    for day, corpus, start in DAYS:
        upload_day(s3.storage_options, f"twin-night/logs/{workers}", day, corpus, start)
        gate = {"max_increase": {"held": 0.05}, "cases": str(cases), "max_new_tokens": 3} if day == "day4" else None
        record = run_night(_cfg(s3, out, workers, gate))
        records.append(record)
        run = record.get("run_id")
        reports.append(json.loads(read_bytes(f"{out}/runs/{run}/report.json", s3.storage_options)) if run else None)
    latest = read_bytes(f"{out}/latest", s3.storage_options).decode().strip()
    return records, reports, latest


@pytest.mark.slow
def test_a_twin_night_on_four_shards_equals_the_embedded_night(ray_local, smollm_folder, s3_server, tmp_path,
                                                               monkeypatch):
    import fsspec

    monkeypatch.setenv("NESTA_RAY_CACHE", str(tmp_path / "cache"))
    s3_server.make_bucket("twin-night")
    twin = save_llama70b_twin(tmp_path / "twin", smollm_folder)
    fsspec.filesystem("s3", **s3_server.storage_options).put(twin + "/", "twin-night/model/", recursive=True)
    sharded = _nights(s3_server, 4, tmp_path)
    embedded = _nights(s3_server, 0, tmp_path)
    for (records, reports, latest), on_shards in ((sharded, True), (embedded, False)):
        decisions = [r["decision"] for r in records]
        assert decisions == ["recompress", "skip", "recompress", "recompress"], [r.get("reason") for r in records]
        assert records[0]["published"] and records[2]["published"] and records[3]["published"] is False
        assert latest == records[2]["run_id"]  # the failing gate of night 4 published nothing
        assert all(("shards" in rep) == on_shards for rep in reports if rep)
    for night, (a, b) in enumerate(zip(sharded[0], embedded[0])):
        if "drift" in a:
            assert a["drift"]["layers"].keys() == b["drift"]["layers"].keys()
            for layer, score in a["drift"]["layers"].items():
                assert score == pytest.approx(b["drift"]["layers"][layer], rel=1e-9, abs=1e-12), (night, layer)
        assert a.get("gate") == b.get("gate"), night
    for a, b in zip(sharded[1], embedded[1]):
        if a is None:
            continue
        assert a["auto_ratio"]["ratio"] == b["auto_ratio"]["ratio"]
        for pa, pb in zip(a["auto_ratio"]["points"], b["auto_ratio"]["points"]):
            assert pa["ratio"] == pb["ratio"] and pa["perplexity"] == pytest.approx(pb["perplexity"], rel=1e-6)
        for name, entry in a["perplexity"].items():
            for kind in ("dense", "compressed"):
                assert entry[kind]["perplexity"] == pytest.approx(b["perplexity"][name][kind]["perplexity"],
                                                                  rel=1e-6)
        assert a["gate_summary"] == b["gate_summary"]
    print({"drift": [r.get("drift", {}).get("max") for r in sharded[0]],
           "ratios": [r and r["auto_ratio"]["ratio"] for r in sharded[1]]})
