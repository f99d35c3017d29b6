"""Bad configs: values, --set overrides and config files, through ``compress --dry-run`` and ``nightly --dry-run``
in this process. Each case names the field or file it expects in the first line of stderr."""

from __future__ import annotations

import pytest

from nesta_ray.compress import main as compress_main
from nesta_ray.nightly import main as nightly_main

# (--set overrides, what the first stderr line names)
BAD_SETS = [
    (["method.ratio=1.5"], "method.ratio"),
    (["method.ratio=-0.1"], "method.ratio"),
    (["method.ratio=abc"], "method.ratio"),
    (["method.ratio=true"], "method.ratio"),
    (["method.ratio=.nan"], "method.ratio"),
    (["method.ratio=[0.3]"], "method.ratio"),
    (["method.name=svd9"], "method.name"),
    (["method.rato=0.3"], "method.ratio"),  # the typo and the field it meant
    (["method.targets=[q_proj"], "--set method.targets"),
    (["method.targets=[]"], "method.targets"),
    (["method.targets=[qproj]"], "unknown targets"),
    (["method.targets=q_proj"], "method.targets"),
    (["method.layers=[1, 1]"], "layers lists an index twice"),
    (["method.layers=[]"], "method.layers"),
    (["method.damping=0.5"], "method.damping"),
    (["method.damping=-1e-3"], "method.damping"),
    (["method.alpha=0"], "method.alpha"),
    (["method.k1_fraction=2"], "method.k1_fraction"),
    (["method.k1_tolerance=-1"], "method.k1_tolerance"),
    (["method.rank_overrides={model.layers.0.self_attn.q_proj: 0}"], "rank_overrides"),
    (["method.ratio=auto"], "auto section"),
    (["method.auto.set=held"], "only with ratio: auto"),
    (["method.ratio=auto", "method.auto.set=nope"], "method.auto.set"),
    (["method.ratio=auto", "method.auto.set=held", "method.auto.min_ratio=0.7"], "min_ratio"),
    (["method.ratio=auto", "method.auto.set=held", "method.auto.step=0"], "method.auto.step"),
    (["method.ratio.x=1"], "method.ratio"),
    (["calibration.seq_len=0"], "calibration.seq_len"),
    (["calibration.seq_len=4"], "calibration.seq_len"),
    (["calibration.seq_len=sixty"], "calibration.seq_len"),
    (["calibration.seq_len=2048", "evaluation.sets.0.first_window=4000"], "calibration.seq_len"),  # beyond the model's context of 1024
    (["calibration.num_sequences=0"], "calibration.num_sequences"),
    (["calibration.num_sequences=200"], "calibration.num_sequences"),
    (["calibration.num_windows=0"], "calibration.num_windows"),
    (["calibration.first_window=-1"], "calibration.first_window"),
    (["calibration.micro_batch=0"], "calibration.micro_batch"),
    (["calibration.select=k-center"], "select k-center"),
    (["calibration.mode=backwards"], "calibration.mode"),
    (["calibration.path="], "give exactly one of path"),
    (["calibration.path='  '"], "calibration.path"),
    (["calibration.path=pypi:evals"], "calibration.path"),
    (["calibration.dataset=c4"], "give exactly one of path"),
    (["calibration.colour=blue"], "calibration.colour"),
    (["evaluation.seq_len=0"], "evaluation.seq_len"),
    (["evaluation.seq_len=4096"], "evaluation.seq_len"),
    (["evaluation.sets.0.num_windows=0"], "evaluation.sets.0.num_windows"),
    (["evaluation.sets=[{name: a, path: x.txt}, {name: a, path: y.txt}]"], "evaluation.sets"),
    (["evaluation.sets.0.first_window=0"], "overlaps the calibration windows"),
    (["evaluation.sets.3.name=x"], "--set evaluation.sets.3.name"),
    (["evaluation.sets.x.name=x"], "--set evaluation.sets.x.name"),
    (["evaluation.batch_size=0"], "evaluation.batch_size"),
    (["evaluation.max_new_tokens=0"], "evaluation.max_new_tokens"),
    (["evaluation.dense=maybe"], "evaluation.dense"),
    (["output.uri="], "output.uri"),
    (["output.uri=''"], "output.uri"),
    (["output.shard_bytes=10"], "output.shard_bytes"),
    (["output.storage_options.anon=true"], "output.storage_options"),  # ignored on a local path
    (["model.storage_options.bogus=1"], "model.storage_options"),
    (["model.dtype=int8"], "model.dtype"),
    (["model.source=''"], "model.source"),
    (["model.cache_dir=''"], "model.cache_dir"),
    (["model=3"], "model"),
    (["runtime.workers=-1"], "runtime.workers"),
    (["runtime.fail_at_layer=1"], "fail_at_layer"),  # with workers 0 nothing would inject it
    (["runtime.backend=deepspeed"], "backend deepspeed"),
    (["runtime.offload=nvme"], "offload nvme"),
    (["runtime.threads_per_task=0"], "runtime.threads_per_task"),
    (["runtime.num_cpus=0"], "runtime.num_cpus"),
    (["runtime.device_memory_gb=0"], "runtime.device_memory_gb"),
    (["runtime.rates.matmul_gflops=0"], "runtime.rates"),
    (["gate.max_increase.held=-0.1"], "max_increase"),
    (["gate.max_increase.nope=0.1"], "gate.max_increase"),
    (["gate.cases=''"], "gate.cases"),
    (["nightly.keep_runs=0"], "nightly.keep_runs"),
    (["nightly.drift_threshold=-1"], "nightly.drift_threshold"),
    (["bogus.x=1"], "bogus"),
    (["noequals"], "--set 'noequals'"),
    (["=3"], "--set"),
    (["method..ratio=0.3"], "--set"),
]


@pytest.mark.parametrize(("sets", "names"), BAD_SETS, ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_a_bad_value_is_one_line_naming_the_field(job, refused, sets, names):
    config = job.write()
    args = ["--config", config, "--dry-run"] + [a for s in sets for a in ("--set", s)]
    refused(lambda: compress_main(args), names, watch=(job.out,))


# (YAML file text, what the first stderr line names)
BAD_FILES = [
    ("model: [\n", "not valid YAML"),
    ("- model\n- method\n", "must hold a mapping"),
    ("model:\n  source: a\nmodel:\n  source: b\n", "appears twice"),
    ("", "calibration"),
    ("model:\n\tsource: x\n", "not valid YAML"),
    ("calibration: !!python/object/apply:os.system ['echo hacked']\n", "not valid YAML"),
    ("1: x\ncalibration: {path: a.txt}\noutput: {uri: o}\n", "1"),
    ("calibration: {path: a.txt}\noutput: {uri: o}\nmethod: {name: " + "x" * 5000 + "}\n", "method.name"),
    ("calibration: {path: a.txt}\noutput: {uri: o}\nmethod: {" + "y" * 5000 + ": 1}\n", "not valid YAML"),
    ("calibration: {path: a.txt}\noutput: {uri: o}\nmethod:\n  " + "y" * 900 + ": 1\n", "method.yyy"),
    ("calibration: {path: a.txt, seq_len: 1e400}\noutput: {uri: o}\n", "calibration.seq_len"),
]


@pytest.mark.parametrize(("text", "names"), BAD_FILES, ids=lambda v: v[:40])
def test_a_bad_config_file_is_one_line_naming_it(job, refused, text, names):
    config = job.write(text=text)
    first = refused(lambda: compress_main(["--config", config, "--dry-run"]), names, watch=(job.out,))
    assert "x" * 200 not in first and "y" * 200 not in first  # a 5 KB value is not echoed whole


def test_a_missing_a_folder_and_a_binary_config_file(job, refused, tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\x00\xff\xfe" * 300)
    for path, names in [(tmp_path / "none.yaml", "does not exist"), (tmp_path, "is a directory"),
                        (binary, "not UTF-8")]:
        refused(lambda path=path: compress_main(["--config", str(path), "--dry-run"]), (str(path), names),
                watch=(job.out,))


def test_a_missing_config_json_for_an_offline_plan(job, refused, tmp_path):
    config = job.write()
    refused(lambda: compress_main(["--config", config, "--dry-run", "--set",
                                   f"model.config_json={tmp_path / 'none.json'}"]), "model.config_json",
            watch=(job.out,))


@pytest.mark.parametrize("args", [[], ["--config"], ["--config", "x.yaml", "--bogus"], ["--set"]])
def test_bad_arguments_are_one_line_too(refused, args):
    refused(lambda: compress_main(args), "see python -m nesta_ray.compress --help")


@pytest.mark.parametrize("sets", [["method.damping=1e-3"], ["method.ratio=1e-1"], ["method.ratio=2E-1"],
                                  ["method.damping=1.0e-6", "method.ratio=0.1"]])
def test_both_spellings_of_a_float_are_accepted(job, capsys, sets):
    """YAML 1.1 reads 1e-1 as a string: both spellings are numbers here."""
    args = ["--config", job.write(), "--dry-run"] + [a for s in sets for a in ("--set", s)]
    assert compress_main(args) == 0, capsys.readouterr().err
    assert "pre-flight" in capsys.readouterr().out


NIGHT_SETS = [
    (["method.targets=[q_proj"], "--set method.targets"),
    (["nightly.sample_sequences=0"], "nightly.sample_sequences"),
    (["nightly.keep_runs=none"], "nightly.keep_runs"),
    (["evaluation.sets=[{name: a, path: x.txt}, {name: a, path: y.txt}]"], "evaluation.sets"),
    (["calibration.seq_len=2048", "evaluation.sets.0.first_window=4000"], "calibration.seq_len"),
    (["output.uri=ftp://127.0.0.1:9/night"], "output.uri"),
]


@pytest.mark.parametrize(("sets", "names"), NIGHT_SETS, ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_the_nightly_cli_refuses_the_same_way(job, refused, sets, names):
    args = ["--config", job.write(), "--dry-run"] + [a for s in sets for a in ("--set", s)]
    refused(lambda: nightly_main(args), names, watch=(job.out,))
