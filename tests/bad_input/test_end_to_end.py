"""End to end: a few refusals as real subprocesses (what a user sees on stderr, no traceback), and the one real job
the suite shares: a calibration set too small for the model and JSON lines with bad records, written to S3 with
planted credentials, warned about and counted, and no secret in anything it prints or writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import s3fs
from bad_input.planted import ENV_SECRET, KEY, SECRETS, SO_SECRET

from nesta_ray.compress import main as compress_main

from paths import REPO


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NESTA_PLANTED_TOKEN": ENV_SECRET,
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", f"nesta_ray.{module}", *args], capture_output=True, text=True,
                          env=env, timeout=300, cwd=REPO)


@pytest.mark.parametrize("case", ["compress_bad_yaml", "evaluate_incomplete_run", "nightly_unreachable_output"])
def test_a_refusal_in_a_subprocess_is_one_line(job, run_copy, texts, case):
    if case == "compress_bad_yaml":
        proc = _cli("compress", "--config", job.write(), "--set", "method.targets=[q_proj", "--set",
                    f"output.storage_options.secret={SO_SECRET}")
        names = "--set method.targets"
    elif case == "evaluate_incomplete_run":
        (run_copy / "manifest.json").unlink()
        (run_copy / "_SUCCESS").unlink()
        proc = _cli("evaluate", "--model", str(run_copy), "--text", texts["text"], "--seq-len", "64")
        names = str(run_copy)
    else:
        proc = _cli("nightly", "--config", job.write(), "--dry-run", "--set",
                    f"output.uri=ftp://u:{SO_SECRET}@127.0.0.1:9/x")
        names = "output.uri"
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and names in lines[0], proc.stderr
    assert proc.stdout == ""
    for secret in SECRETS:
        assert secret not in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_shared_job_warns_counts_and_writes_no_secret(ray_local, job, texts, s3_server, tmp_path, capsys):
    """One real job: 4 calibration windows (each Gram sees a few tokens per dimension: warned in the plan, on stderr
    and in the report), a JSON-lines calibration text with bad records (counted), output on S3 with the key and
    secret in storage_options (the report keeps the keys, not the values)."""
    rows = [json.dumps({"text": t}) for t in Path(texts["text"]).read_text().split("\n\n")[:300]]
    rows[3:3] = ["{broken", json.dumps({"body": "no text"})]
    calibration = tmp_path / "calibration.jsonl"
    calibration.write_text("\n".join(rows) + "\n")
    bucket = s3_server.make_bucket("bad-input-job")
    options = {"key": KEY, "secret": SO_SECRET, "client_kwargs": {"endpoint_url": s3_server.endpoint}}
    raw = {**job.raw, "calibration": {"path": str(calibration), "seq_len": 64, "num_windows": 60, "num_sequences": 4},
           "evaluation": {"seq_len": 64, "sets": [{"name": "held", "path": texts["text"], "num_windows": 2}]},
           "output": {"uri": f"{bucket}/root", "storage_options": options}}
    assert compress_main(["--config", job.write(raw), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "warning: calibration.num_sequences" in plan
    assert compress_main(["--config", job.write(raw)]) == 0
    out, err = capsys.readouterr()
    assert "warning: calibration.num_sequences" in err
    fs = s3fs.S3FileSystem(**options)
    run = f"bad-input-job/root/runs/{fs.cat_file('bad-input-job/root/latest').decode().strip()}"
    report = json.loads(fs.cat_file(f"{run}/report.json"))
    assert any("calibration.num_sequences" in w for w in report["warnings"])
    assert report["skipped_records"] == {str(calibration): {"invalid json": 1, "no 'text' field": 1}}
    written = "".join(fs.cat_file(f"{run}/{name}").decode() for name in ("report.json", "report.md", "report.html"))
    for text in (plan, out, err, written):
        for secret in (*SECRETS, KEY):
            assert secret not in text
