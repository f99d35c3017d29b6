"""Damaged compressed runs and output roots: ``evaluate --model`` never scores one as a dense model, ``load_any``
names the real problem, and no loader reads a file the manifest did not verify."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from nesta_ray.checkpoint.layout import INDEX
from nesta_ray.checkpoint.reader import load_any, load_compressed
from nesta_ray.checkpoint.runs import verify_files
from nesta_ray.errors import CheckpointError
from nesta_ray.evaluate import main as evaluate_main


def _resign(run: Path, name: str) -> None:
    """Update the manifest's sha256 and size of ``name`` after it was rewritten (as a forger would)."""
    manifest = json.loads((run / "manifest.json").read_text())
    data = (run / name).read_bytes()
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (run / "manifest.json").write_text(json.dumps(manifest))


def _index_to(run: Path, target: str) -> None:
    """Point every tensor of the run's index at ``target`` and re-sign the index in the manifest."""
    index = json.loads((run / INDEX).read_text())
    index["weight_map"] = dict.fromkeys(index["weight_map"], target)
    (run / INDEX).write_text(json.dumps(index))
    _resign(run, INDEX)


def _shard(run: Path) -> Path:
    return sorted(run.glob("model-*.safetensors"))[0]


def _damage(run: Path, kind: str) -> Path:
    """Damage the run copy ``run``; returns the URI to load (the run, or its root for the latest cases)."""
    root = run.parent / "root"
    if kind == "no_manifest":
        (run / "manifest.json").unlink()
    elif kind == "no_success":
        (run / "_SUCCESS").unlink()
    elif kind == "neither":
        (run / "manifest.json").unlink()
        (run / "_SUCCESS").unlink()
    elif kind == "no_nesta_json":
        (run / "nesta.json").unlink()
    elif kind == "only_factors":
        for p in run.iterdir():
            if not p.name.endswith(".safetensors"):
                p.unlink()
    elif kind == "manifest_not_json":
        (run / "manifest.json").write_text("{cut")
    elif kind == "format_99":
        manifest = json.loads((run / "manifest.json").read_text())
        (run / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    elif kind == "manifest_escape":
        manifest = json.loads((run / "manifest.json").read_text())
        manifest["files"]["../escape.json"] = {"sha256": "0" * 64, "size": 2}
        (run / "manifest.json").write_text(json.dumps(manifest))
    elif kind == "flipped_byte":
        shard = _shard(run)
        data = bytearray(shard.read_bytes())
        data[-10] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif kind == "truncated_shard":
        shard = _shard(run)
        shard.write_bytes(shard.read_bytes()[:-100])
    elif kind == "stray":
        shutil.copy(_shard(run), run / "model.safetensors")
    elif kind == "index_absolute":
        _index_to(run, str(_shard(run).resolve()))
    elif kind == "index_parent":
        shutil.copy(_shard(run), run.parent / "outside.safetensors")
        _index_to(run, "../outside.safetensors")
    elif kind == "index_unlisted":
        _index_to(run, "extra.safetensors")
    elif kind in ("latest_missing", "latest_empty", "latest_escape", "runs_no_latest"):
        (root / "runs").mkdir(parents=True)
        shutil.move(str(run), root / "runs" / "r")
        if kind != "runs_no_latest":
            (root / "latest").write_text({"latest_missing": "gone\n", "latest_empty": "\n",
                                          "latest_escape": "../..\n"}[kind])
        return root
    else:
        raise AssertionError(kind)
    return run


# (damage, what the first stderr line says)
BAD_RUNS = [
    ("no_manifest", "incomplete or damaged"), ("no_success", "_SUCCESS"), ("neither", "incomplete or damaged"),
    ("no_nesta_json", "nesta.json"), ("only_factors", "factor tensor"), ("manifest_not_json", "manifest.json"),
    ("format_99", "format_version"), ("manifest_escape", "escape"), ("flipped_byte", "sha256"),
    ("truncated_shard", "size"), ("stray", "not listed"), ("index_absolute", "names the file"),
    ("index_parent", "names the file"), ("index_unlisted", "names the file"), ("latest_missing", "gone"),
    ("latest_empty", "latest"), ("latest_escape", "latest"), ("runs_no_latest", "latest"),
]


@pytest.mark.parametrize(("kind", "says"), BAD_RUNS)
def test_a_damaged_run_is_never_scored(refused, run_copy, texts, kind, says):
    uri = _damage(run_copy, kind)
    refused(lambda: evaluate_main(["--model", str(uri), "--text", texts["text"], "--seq-len", "64"]), says,
            watch=(run_copy.parent,))


@pytest.mark.parametrize(("kind", "says"), BAD_RUNS[:6] + BAD_RUNS[-4:])
def test_load_any_names_the_real_problem(run_copy, kind, says):
    uri = _damage(run_copy, kind)
    with pytest.raises(CheckpointError, match=says):
        load_any(str(uri))
    with pytest.raises(CheckpointError):
        load_compressed(str(uri))


@pytest.mark.parametrize("kind", ["index_absolute", "index_parent", "index_unlisted"])
def test_verify_files_refuses_an_index_naming_unverified_files(run_copy, kind):
    """What the layer shards call before reading a published run's factors (``shard_weights.run_factors``)."""
    _damage(run_copy, kind)
    with pytest.raises(CheckpointError, match="names the file"):
        verify_files(str(run_copy), [])


def test_the_intact_run_is_scored(capsys, run_copy, texts):
    """The cases above fail for their damage alone: the same run, intact, is scored."""
    assert evaluate_main(["--model", str(run_copy), "--text", texts["text"], "--seq-len", "64",
                          "--max-windows", "1"]) == 0
    out = capsys.readouterr().out
    assert str(run_copy) in out and texts["text"] in out
