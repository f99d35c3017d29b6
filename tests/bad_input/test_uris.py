"""URIs and credentials: unsupported, unreachable or unwritable outputs, credentials in URIs and storage options. No
planted secret (``SO_SECRET`` in a URI or storage_options, ``ENV_SECRET`` in the environment) is ever echoed."""

from __future__ import annotations

import pytest
from bad_input.planted import ENV_SECRET, KEY, SO_SECRET

from nesta_ray.compress import main as compress_main
from nesta_ray.nightly import main as nightly_main

CRED = f"{KEY}:{SO_SECRET}@"

# (--set overrides, what the first stderr line names)
CREDENTIALS = [
    ([f"output.uri=s3://{CRED}bucket/out"], "output.uri"),
    ([f"model.source=s3://{CRED}bucket/model"], "model.source"),
    ([f"calibration.path=s3://{CRED}bucket/c.txt"], "calibration.path"),
    ([f"evaluation.sets.0.path=s3://{CRED}bucket/e.txt"], "evaluation.sets.0.path"),
    ([f"gate.cases=gs://{CRED}bucket/cases.jsonl"], "gate.cases"),
    ([f"output.uri=s3://{CRED}" + "b" * 5000], "output.uri"),
    (["output.uri=s3://bucket/out", f"output.storage_options=secret={SO_SECRET}"], "output.storage_options"),
    (["output.uri=s3://bucket/out", f"output.storage_options.secret={SO_SECRET}", "method.ratio=2"],
     "method.ratio"),
    (["output.uri=s3://bucket/out", f"output.storage_options.secret=[{SO_SECRET}"], "output.storage_options"),
    (["output.uri=s3://bucket/out", f"output.storage_options.sekret={SO_SECRET}"], "output.storage_options"),
    (["output.uri=s3://bucket/out", f"output.storage_options.client_kwargs.endpoint_url=1{SO_SECRET}",
      "runtime.workers=x"], "runtime.workers"),
    ([f"model.storage_options.secret={SO_SECRET}"], "model.storage_options"),  # a local path takes none
    ([f"method.name={ENV_SECRET}"], "method.name"),
    ([f"evaluation.sets.0.name={ENV_SECRET}", f"gate.max_increase.{ENV_SECRET}x=1"], "gate.max_increase"),
    ([f"calibration.path=/no/such/{ENV_SECRET}.txt"], "calibration.path"),
    ([f"calibration.path=/no/such/{SO_SECRET}.txt", f"output.storage_options.x={SO_SECRET}"],
     "output.storage_options"),
]


@pytest.mark.parametrize(("sets", "names"), CREDENTIALS, ids=lambda v: v if isinstance(v, str) else " ".join(v)[:60])
def test_no_secret_comes_back(job, refused, sets, names):
    args = ["--config", job.write(), "--dry-run"] + [a for s in sets for a in ("--set", s)]
    first = refused(lambda: compress_main(args), names, watch=(job.out,))
    assert KEY not in first and "b" * 200 not in first


def test_a_secret_in_the_config_file_is_not_echoed_by_nightly(job, refused):
    raw = {**job.raw, "output": {"uri": f"s3://{CRED}bucket/night", "storage_options": {"secret": SO_SECRET}}}
    refused(lambda: nightly_main(["--config", job.write(raw), "--dry-run"]), "output.uri", watch=(job.out,))


# (output URI, what the first stderr line says); the dry run probes each without creating anything
OUTPUTS = [
    ("ftp://127.0.0.1:9/x", "127.0.0.1"),
    (f"ftp://user:{SO_SECRET}@127.0.0.1:9/x", "127.0.0.1"),
    ("nosuchscheme://bucket/x", "unsupported"),
    ("{out}/keep.txt", "is a file"),
    ("{out}/keep.txt/sub", "is a file"),
    ("file://{out}/keep.txt", "is a file"),
]


@pytest.mark.parametrize(("uri", "says"), OUTPUTS)
def test_an_output_that_cannot_be_written_is_refused_by_the_dry_run(job, refused, uri, says):
    args = ["--config", job.write(), "--dry-run", "--set", f"output.uri={uri.format(out=job.out)}"]
    refused(lambda: compress_main(args), ("output.uri", says), watch=(job.out,))


def test_a_dry_run_creates_no_output_folder(job, capsys, tmp_path):
    new = tmp_path / "new" / "root"
    assert compress_main(["--config", job.write(), "--dry-run", "--set", f"output.uri={new}"]) == 0
    assert f"would be created in {tmp_path}" in capsys.readouterr().out
    assert not (tmp_path / "new").exists()


@pytest.fixture
def s3_job(job, s3_server):
    """The base job with its output on moto's S3, credentials planted in storage_options."""
    bucket = s3_server.make_bucket("bad-input")
    raw = {**job.raw, "output": {"uri": f"{bucket}/root", "storage_options": {
        "key": KEY, "secret": SO_SECRET, "client_kwargs": {"endpoint_url": s3_server.endpoint}}}}
    return job, raw


@pytest.mark.parametrize(("change", "says"), [
    ({"uri": "s3://no-such-bucket-nesta/root"}, "no-such-bucket-nesta"),
    ({"storage_options": {"key": KEY, "secret": SO_SECRET, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}},
     "127.0.0.1:9"),
    ({"storage_options": {"key": KEY, "secret": SO_SECRET, "endpoint": "http://127.0.0.1:9"}}, "endpoint"),
])
def test_an_s3_output_that_cannot_be_reached(s3_job, refused, change, says):
    job, raw = s3_job
    raw = {**raw, "output": {**raw["output"], **change}}
    refused(lambda: compress_main(["--config", job.write(raw), "--dry-run"]), ("output", says), watch=(job.out,))


def test_an_s3_output_is_probed_and_nothing_echoed(s3_job, capsys):
    job, raw = s3_job
    assert compress_main(["--config", job.write(raw), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert "probe object written and deleted" in out
    assert SO_SECRET not in out + err and KEY not in out + err


@pytest.mark.parametrize(("sets", "names"), [
    (["output.uri=ftp://127.0.0.1:9/x"], "output.uri"),
    (["output.uri={out}/keep.txt"], "output.uri"),
    (["calibration.path={out}/none.txt"], "calibration.path"),
    (["calibration.seq_len=2048", "evaluation.sets.0.first_window=4000"], "calibration.seq_len"),
])
def test_the_job_runs_the_same_pre_flight_before_any_work(job, refused, sets, names):
    """Without --dry-run: refused before Ray starts or anything is written."""
    args = ["--config", job.write()] + [a for s in sets for a in ("--set", s.format(out=job.out))]
    refused(lambda: compress_main(args), names, watch=(job.out,))
