"""Unreadable text: as calibration, evaluation and gate files in the dry run's pre-flight, and through
``evaluate --text``; and the evaluate CLI's own arguments."""

from __future__ import annotations

from pathlib import Path

import pytest

from nesta_ray.compress import main as compress_main
from nesta_ray.evaluate import main as evaluate_main

# (text file name in the ``texts`` fixture, what the first line says besides the field and the file)
BAD_TEXTS = [
    ("missing", "does not exist"),
    ("binary", "not UTF-8"),
    ("utf16", "not UTF-8"),
    ("parquet_named", "not a Parquet file"),
    ("folder", "is a folder"),
    ("table", "unknown text format"),
    ("empty", "is empty"),
    ("nofield", "'text'"),
    ("garbage", "'text'"),
    ("nocol", "no column 'text'"),
]


def _path(texts, name):
    return texts.get(name, f"{texts['text']}.missing.txt")


@pytest.mark.parametrize(("name", "says"), BAD_TEXTS)
def test_bad_calibration_text_is_refused_by_the_dry_run(job, refused, texts, name, says):
    args = ["--config", job.write(), "--dry-run", "--set", f"calibration.path={_path(texts, name)}"]
    refused(lambda: compress_main(args), ("calibration.path", says), watch=(job.out,))


@pytest.mark.parametrize(("name", "says"), BAD_TEXTS[:6])
def test_bad_evaluation_text_is_refused_by_the_dry_run(job, refused, texts, name, says):
    args = ["--config", job.write(), "--dry-run", "--set", f"evaluation.sets.0.path={_path(texts, name)}"]
    refused(lambda: compress_main(args), ("evaluation.sets.0.path", says), watch=(job.out,))


@pytest.mark.parametrize(("name", "says"), [("missing", "does not exist"), ("cases_binary", "not UTF-8"),
                                            ("cases_bad", "cases_bad"), ("folder", "is a folder")])
def test_bad_gate_cases_are_refused_by_the_dry_run(job, refused, texts, name, says):
    args = ["--config", job.write(), "--dry-run", "--set", f"gate.cases={_path(texts, name)}"]
    refused(lambda: compress_main(args), ("gate.cases", says), watch=(job.out,))


def test_request_logs_that_match_no_file(job, refused, texts):
    raw = {**job.raw, "calibration": {"logs": {"uri": texts["logs_empty"]}, "seq_len": 64, "num_sequences": 4}}
    refused(lambda: compress_main(["--config", job.write(raw), "--dry-run"]), ("calibration.logs.uri", "no log file"),
            watch=(job.out,))


@pytest.mark.parametrize(("name", "says"), [*BAD_TEXTS, ("short", "fewer than one window")])
def test_bad_text_through_evaluate(refused, tiny3_folder, texts, tmp_path, name, says):
    path = _path(texts, name)
    refused(lambda: evaluate_main(["--model", tiny3_folder, "--text", path, "--seq-len", "64", "--json",
                                   str(tmp_path / "out" / "r.json")]), (path, says), watch=(tmp_path,))


@pytest.mark.parametrize(("args", "names"), [
    (["--seq-len", "0"], "--seq-len"), (["--seq-len", "1"], "--seq-len"), (["--seq-len", "-4"], "--seq-len"),
    (["--seq-len", "abc"], "--seq-len"), (["--seq-len", "9" * 5000], "--seq-len"), (["--max-windows", "0"],
                                                                                 "--max-windows"),
    (["--max-windows", "-1"], "--max-windows"), (["--bogus"], "--bogus"), (["--text"], "--text"),
])
def test_bad_evaluate_arguments(refused, tiny3_folder, texts, args, names):
    first = refused(lambda: evaluate_main(["--model", tiny3_folder, "--text", texts["text"], *args]), names)
    assert "9" * 200 not in first


def test_evaluate_json_into_a_folder_that_cannot_be_one(refused, tiny3_folder, texts, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    refused(lambda: evaluate_main(["--model", tiny3_folder, "--text", texts["text"], "--seq-len", "64",
                                   "--max-windows", "1", "--json", str(blocker / "r.json")]), "--json",
            watch=(tmp_path,))


def test_evaluate_counts_skipped_json_lines(capsys, tiny3_folder, texts, tmp_path):
    """Malformed JSON lines are counted, on stderr and in the JSON written."""
    import json

    mixed = tmp_path / "mixed.jsonl"
    lines = [json.dumps({"text": t}) for t in Path(texts["text"]).read_text().split("\n\n")[:200]]
    mixed.write_text("\n".join(lines[:3] + ["{broken", '{"body": 1}', '{"text": 7}'] + lines[3:]) + "\n")
    assert evaluate_main(["--model", tiny3_folder, "--text", str(mixed), "--seq-len", "64", "--max-windows", "1",
                          "--json", str(tmp_path / "r.json")]) == 0
    assert "skipped 3 lines" in capsys.readouterr().err
    assert json.loads((tmp_path / "r.json").read_text())["skipped_records"][str(mixed)] == {
        "'text' is not a string": 1, "invalid json": 1, "no 'text' field": 1}
