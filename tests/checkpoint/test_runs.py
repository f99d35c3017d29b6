"""The run store (nesta_ray.checkpoint.runs) against real local folders and a real moto S3 server through s3fs."""

from __future__ import annotations

import hashlib
import json
import os
import uuid

import pytest
import torch
from safetensors.torch import load_file

from nesta_ray.checkpoint import runs
from nesta_ray.errors import CheckpointError
from nesta_ray.io import storage


@pytest.fixture(params=["local", "file", "s3"])
def root(request, tmp_path):
    """(root URI, storage_options) for a fresh, empty run root: a local path, a file:// URI or a fresh bucket."""
    if request.param == "local":
        return str(tmp_path / "out"), None
    if request.param == "file":
        return f"file://{tmp_path}/out/", None
    srv = request.getfixturevalue("s3_server")
    bucket = srv.make_bucket(f"b-{uuid.uuid4().hex[:12]}")
    return f"{bucket}/models/tiny", srv.storage_options


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{seed}.a": torch.randn(4, 3, generator=g),
            f"layers.{seed}.b": torch.randn(5, generator=g).to(torch.bfloat16),
            f"layers.{seed}.idx": torch.arange(6, dtype=torch.int64)}


def _write_run(root_uri, opts, run_id, *, publish=True, extra_file=None) -> tuple[str, dict]:
    w = runs.RunWriter(root_uri, run_id, opts)
    t1, t2 = _tensors(1), _tensors(2)
    w.put_tensors("model-00001.safetensors", t1, metadata={"format": "pt"})
    w.put_tensors("model-00002.safetensors", t2)
    w.put_json("config.json", {"run": run_id, "ratio": 0.2})
    if extra_file:
        w.put_file("sub/notes.txt", extra_file)
    return w.commit(publish=publish), {**t1, **t2}


def _rewrite(uri, opts, fn) -> None:
    """Change a stored file out-of-band (a separate filesystem instance), as another process would."""
    fs, path = storage.url_to_fs(uri, {**(opts or {}), "skip_instance_cache": True})
    fs.pipe_file(path, fn(fs.cat_file(path)))


def test_round_trip(root, tmp_path, monkeypatch):
    root_uri, opts = root
    monkeypatch.setattr(storage, "CHUNK", 1024)  # hash and copy in many chunks
    src = tmp_path / "notes.txt"
    src.write_bytes(os.urandom(10_000))
    run_uri, tensors = _write_run(root_uri, opts, "r1", extra_file=str(src))

    assert runs.resolve_run(root_uri, opts) == run_uri
    assert runs.resolve_run(run_uri, opts) == run_uri
    assert storage.read_bytes(storage.join(root_uri, "latest"), opts).decode().strip() == "r1"
    manifest = runs.verify_run(run_uri, opts)
    assert manifest["format_version"] == runs.FORMAT_VERSION and manifest["run_id"] == "r1"
    assert set(manifest["files"]) == {"model-00001.safetensors", "model-00002.safetensors", "config.json",
                                      "sub/notes.txt", runs.INDEX}
    want = {"size": 10_000, "sha256": hashlib.sha256(src.read_bytes()).hexdigest()}
    assert manifest["files"]["sub/notes.txt"] == want

    index = storage.read_json(storage.join(run_uri, runs.INDEX), opts)
    assert index["weight_map"] == {**{k: "model-00001.safetensors" for k in _tensors(1)},
                                   **{k: "model-00002.safetensors" for k in _tensors(2)}}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())

    local = runs.download_run(run_uri, str(tmp_path / "dl"), opts)
    loaded = {**load_file(os.path.join(local, "model-00001.safetensors")),
              **load_file(os.path.join(local, "model-00002.safetensors"))}
    assert loaded.keys() == tensors.keys()
    for k, t in tensors.items():
        assert loaded[k].dtype == t.dtype and torch.equal(loaded[k], t)
    with open(os.path.join(local, "sub", "notes.txt"), "rb") as f:
        assert f.read() == src.read_bytes()
    with open(os.path.join(local, "config.json")) as f:
        text = f.read()
    assert text.endswith("\n") and json.loads(text) == {"ratio": 0.2, "run": "r1"}
    assert runs.verify_run(local)["files"] == manifest["files"]  # the download is itself a complete run
    assert runs.list_runs(root_uri, opts) == ["r1"]


def test_second_run_moves_latest_and_unpublished_does_not(root):
    root_uri, opts = root
    r1, _ = _write_run(root_uri, opts, "r1")
    r2, _ = _write_run(root_uri, opts, "r2")
    assert runs.resolve_run(root_uri, opts) == r2
    r3, _ = _write_run(root_uri, opts, "r3", publish=False)
    assert runs.resolve_run(root_uri, opts) == r2
    assert runs.verify_run(r3, opts)["run_id"] == "r3"
    assert runs.verify_run(r1, opts)["run_id"] == "r1"
    assert runs.list_runs(root_uri, opts) == ["r1", "r2", "r3"]
    with pytest.raises(CheckpointError, match="already committed"):
        runs.RunWriter(root_uri, "r2", opts)


def test_abandoned_run_is_never_read(root, tmp_path):
    root_uri, opts = root
    r1, _ = _write_run(root_uri, opts, "r1")
    w = runs.RunWriter(root_uri, "r2", opts)
    w.put_tensors("model-00001.safetensors", _tensors(7))
    w.put_json("config.json", {"partial": True})
    del w  # abandoned: no commit

    assert runs.resolve_run(root_uri, opts) == r1
    assert storage.read_bytes(storage.join(root_uri, "latest"), opts) == b"r1\n"
    assert runs.verify_run(r1, opts)["run_id"] == "r1"
    r2 = storage.join(root_uri, "runs", "r2")
    with pytest.raises(CheckpointError, match="_SUCCESS"):
        runs.verify_run(r2, opts)
    with pytest.raises(CheckpointError, match="_SUCCESS"):
        runs.download_run(r2, str(tmp_path / "dl"), opts)
    with pytest.raises(CheckpointError, match="neither manifest.json nor latest"):
        runs.resolve_run(r2, opts)


@pytest.mark.parametrize("how", ["flip", "grow"])
def test_tampered_file_is_refused(root, tmp_path, how):
    root_uri, opts = root
    run_uri, _ = _write_run(root_uri, opts, "r1")
    target = storage.join(run_uri, "model-00002.safetensors")
    if how == "flip":
        _rewrite(target, opts, lambda b: b[:-1] + bytes([b[-1] ^ 0x01]))
        match = r"model-00002\.safetensors.*sha256"
    else:
        _rewrite(target, opts, lambda b: b + b"\0")
        match = r"model-00002\.safetensors.*size"
    if how == "flip":  # same size: only the hash check can catch it
        assert runs.verify_run(run_uri, opts, check_hashes=False)["run_id"] == "r1"
    with pytest.raises(CheckpointError, match=match):
        runs.verify_run(run_uri, opts)
    with pytest.raises(CheckpointError, match=r"model-00002\.safetensors"):
        runs.download_run(run_uri, str(tmp_path / "dl"), opts)


def test_files_named_after_the_manifest_was_read_are_hashed_against_it(root):
    root_uri, opts = root
    run_uri, _ = _write_run(root_uri, opts, "r1")
    manifest = runs.verify_files(run_uri, [], opts)  # the index only
    runs.hash_files(run_uri, manifest, ["model-00001.safetensors"], opts)
    _rewrite(storage.join(run_uri, "model-00002.safetensors"), opts, lambda b: b[:-1] + bytes([b[-1] ^ 0x01]))
    runs.hash_files(run_uri, manifest, ["model-00001.safetensors"], opts)  # only what is named is read
    with pytest.raises(CheckpointError, match=r"model-00002\.safetensors: sha256 mismatch"):
        runs.hash_files(run_uri, manifest, ["model-00002.safetensors"], opts)
    with pytest.raises(CheckpointError, match="does not list 'other.bin'"):
        runs.hash_files(run_uri, manifest, ["other.bin"], opts)


def test_missing_file_and_wrong_format_version(tmp_path):
    run_uri, _ = _write_run(str(tmp_path), None, "r1")
    os.remove(os.path.join(run_uri, "config.json"))
    with pytest.raises(CheckpointError, match=r"config\.json.*missing"):
        runs.verify_run(run_uri)
    run_uri, _ = _write_run(str(tmp_path), None, "r2")
    _rewrite(storage.join(run_uri, "manifest.json"), None,
             lambda b: json.dumps({**json.loads(b), "format_version": 99}).encode())
    with pytest.raises(CheckpointError, match="format_version 99"):
        runs.verify_run(run_uri)


def test_writer_rejects_duplicates_and_second_commit(tmp_path):
    w = runs.RunWriter(str(tmp_path), "r1")
    w.put_tensors("a.safetensors", {"x": torch.zeros(2), "y": torch.ones(3)})
    with pytest.raises(CheckpointError, match="'y' already written"):
        w.put_tensors("b.safetensors", {"z": torch.zeros(1), "y": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="already written"):
        w.put_bytes("a.safetensors", b"x")
    with pytest.raises(CheckpointError, match="reserved"):
        w.put_bytes("manifest.json", b"{}")
    with pytest.raises(CheckpointError, match="invalid file name"):
        w.put_bytes("../escape", b"x")
    run_uri = w.commit()
    assert not os.path.exists(os.path.join(run_uri, "b.safetensors"))
    assert runs.verify_run(run_uri)["files"].keys() == {"a.safetensors", runs.INDEX}
    with pytest.raises(CheckpointError, match="already called"):
        w.commit()
    with pytest.raises(CheckpointError, match="closed"):
        w.put_bytes("late.bin", b"x")


def test_resolve_empty_root(root):
    root_uri, opts = root
    with pytest.raises(CheckpointError, match="neither manifest.json nor latest"):
        runs.resolve_run(root_uri, opts)
    assert runs.list_runs(root_uri, opts) == []
    with pytest.raises(CheckpointError, match="does not exist"):
        storage.read_bytes(storage.join(root_uri, "latest"), opts)
