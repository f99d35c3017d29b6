"""The quality gate: case files, limits, and a job that publishes only when its gate passes."""

import json

import pytest

from nesta_ray.checkpoint.runs import verify_run
from nesta_ray.compress import main as compress_main
from nesta_ray.config.loading import validate
from nesta_ray.errors import ConfigError, DataError
from nesta_ray.ops.gate import Case, check_gate, parse_cases
from nesta_ray.pipeline.job import run_job

from paths import C4 as CORPUS


def _ppl(dense, compressed, nonfinite=0):
    return {"dense": {"perplexity": dense, "nonfinite_windows": 0},
            "compressed": {"perplexity": compressed, "nonfinite_windows": nonfinite}}


def test_parse_cases_reads_both_kinds_and_names_the_bad_line():
    cases = parse_cases('{"prompt": "2+2=", "expect": "4"}\n\n{"name": "cap", "prompt": "Paris is", '
                        '"continuation": " the capital"}\n', "cases.jsonl")
    assert cases == [Case("case1", "2+2=", expect="4"), Case("cap", "Paris is", continuation=" the capital")]
    with pytest.raises(DataError, match="cases.jsonl line 2: give exactly one of"):
        parse_cases('{"prompt": "a", "expect": "b"}\n{"prompt": "a", "expect": "b", "continuation": "c"}', "cases.jsonl")
    with pytest.raises(DataError, match="line 1: not JSON"):
        parse_cases("{prompt: 1}", "cases.jsonl")
    with pytest.raises(DataError, match="unknown keys \\['expected'\\]"):
        parse_cases('{"prompt": "a", "expected": "b"}', "cases.jsonl")
    with pytest.raises(DataError, match="no critical cases"):
        parse_cases("\n", "cases.jsonl")


def test_check_gate_reports_which_set_or_case_failed_and_by_how_much():
    ppl = {"web": _ppl(20.0, 21.0), "wiki": _ppl(10.0, 13.0), "ja": _ppl(5.0, float("inf"), nonfinite=1)}
    cases = [Case("sum", "2+2=", expect="4"), Case("cap", "Paris is", continuation="the capital of France")]
    result = check_gate(ppl, {"web": 0.10, "wiki": 0.25, "ja": 1.0}, cases,
                        {"sum": " 4, and", "cap": " the capital city"})
    assert not result.passed and result.checks == 5
    failed = {(f.kind, f.name): f for f in result.failures}
    assert set(failed) == {("perplexity", "wiki"), ("perplexity", "ja"), ("case", "cap")}
    assert failed[("perplexity", "wiki")].value == pytest.approx(0.3) and "+30.0%" in failed[("perplexity", "wiki")].detail
    assert "non-finite" in failed[("perplexity", "ja")].detail
    assert failed[("case", "cap")].value == len("the capital ")
    assert result.summary().startswith("failed: perplexity wiki: +30.0% over dense")
    assert check_gate(ppl, {"web": 0.05 + 0.05}, cases[:1], {"sum": "4"}).passed
    with pytest.raises(DataError, match="gate.max_increase.code: no dense and compressed"):
        check_gate(ppl, {"code": 0.1}, [], {})


def _cfg(folder, out, cases_file, max_increase):
    return {
        "model": {"source": folder},
        "method": {"name": "nsvd1", "ratio": 0.3},
        "calibration": {"path": CORPUS, "seq_len": 64, "num_windows": 100, "num_sequences": 4, "micro_batch": 2},
        "evaluation": {"seq_len": 64, "sets": [{"name": "held", "path": CORPUS, "first_window": 100, "num_windows": 2}]},
        "output": {"uri": str(out)},
        "runtime": {"progress": False},
        "gate": {"max_increase": {"held": max_increase}, "cases": str(cases_file), "max_new_tokens": 4},
    }


def test_config_refuses_a_gate_on_a_set_that_is_not_evaluated(tmp_path):
    raw = _cfg("x", tmp_path, tmp_path / "c.jsonl", 0.1)
    raw["gate"]["max_increase"] = {"c4": 0.1}
    with pytest.raises(ConfigError, match=r"gate.max_increase names sets \['c4'\]"):
        validate(raw)
    raw["gate"]["max_increase"] = {"held": -0.1}
    with pytest.raises(ConfigError, match="gate: max_increase limits must be >= 0"):
        validate(raw)


def test_a_failing_gate_keeps_the_run_but_does_not_move_latest(ray_local, tiny_folder, tmp_path, capsys):
    raw = _cfg(tiny_folder, tmp_path / "out", None, 1000.0)
    del raw["gate"]["cases"]
    passing = run_job(validate(raw))
    assert passing["published"] and passing["gate"]["passed"] and passing["gate"]["checks"] == 1
    assert (tmp_path / "out" / "latest").read_text().strip() == passing["run_id"]

    cases = tmp_path / "cases.jsonl"
    cases.write_text(json.dumps({"name": "never", "prompt": "The", "expect": "§never§"}) + "\n")
    config = tmp_path / "job.yaml"
    config.write_text(json.dumps(_cfg(tiny_folder, tmp_path / "out", cases, 1000.0)))
    assert compress_main(["--config", str(config), "--set", "method.ratio=0.4"]) == 3
    captured = capsys.readouterr()
    assert "gate failed: case never: '§never§' not in the continuation" in captured.err
    assert "FAILED: not published" in captured.out
    assert (tmp_path / "out" / "latest").read_text().strip() == passing["run_id"]  # unchanged
    runs = sorted(p.name for p in (tmp_path / "out" / "runs").iterdir())
    failed_run = next(r for r in runs if r != passing["run_id"])
    verify_run(str(tmp_path / "out" / "runs" / failed_run))  # complete and intact, just not published
    report = json.loads((tmp_path / "out" / "runs" / failed_run / "report.json").read_text())
    assert report["gate"]["failures"][0]["name"] == "never" and not report["published"]
