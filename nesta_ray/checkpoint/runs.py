"""Runs on storage: write one run under ``<root>/runs/<id>`` (files, then manifest, ``_SUCCESS``, ``latest``),
find, verify and download runs. A failure part-way through a run leaves earlier runs and ``latest`` untouched.

Names come from ``layout``; storage faults raise ``StorageError``, missing, incomplete or corrupt runs
``CheckpointError``.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import posixpath
from collections.abc import Collection, Mapping
from typing import Any

import torch
from safetensors.torch import save as st_save

from nesta_ray.checkpoint.layout import (
    CONFIG,
    FORMAT_VERSION,
    HF_INDEX,
    INDEX,
    LATEST,
    MANIFEST,
    MODEL_TYPE,
    NESTA_JSON,
    READABLE_VERSIONS,
    RUNS,
    SUCCESS,
)
from nesta_ray.errors import CheckpointError, ModelError
from nesta_ray.io.storage import (
    fs_kind,
    guard,
    hash_stream,
    join,
    json_bytes,
    list_names,
    normalise,
    one_line,
    put_atomic,
    read_bytes,
    read_json,
    url_to_fs,
)
from nesta_ray.io.weights import tensor_names


def _check_name(name: str) -> str:
    if not name or name.startswith("/") or "\\" in name or any(s in ("", ".", "..") for s in name.split("/")):
        raise CheckpointError(f"invalid file name {name!r}: use a relative path without '.', '..' or empty parts")
    return name


class RunWriter:
    """Writes one run under ``root_uri/runs/<run_id>``; nothing is readable until ``commit()``."""

    def __init__(self, root_uri: str, run_id: str, storage_options: dict | None = None) -> None:
        """Raises CheckpointError for an invalid run id or one already committed under root_uri; StorageError."""
        if not run_id or "/" in run_id or run_id in (".", "..") or run_id != run_id.strip():
            raise CheckpointError(f"invalid run id {run_id!r}: use a non-empty name without '/'")
        self.root_uri, self.run_id, self._opts = normalise(root_uri), run_id, storage_options
        self._fs, self._root = url_to_fs(self.root_uri, storage_options)
        self._path = join(self._root, RUNS, run_id)
        self._files: dict[str, dict[str, Any]] = {}  # relpath -> {"sha256", "size"}
        self._weight_map: dict[str, str] = {}  # tensor key -> relpath
        self._total_size, self._state = 0, "open"
        with guard(self.run_uri, storage_options, write=True):
            self._fs.invalidate_cache()
            if self._fs.exists(join(self._path, SUCCESS)):
                raise CheckpointError(f"run {self.run_uri} is already committed: choose another run id")
            if fs_kind(self._fs) != "object":
                self._fs.makedirs(self._path, exist_ok=True)

    @property
    def bytes_written(self) -> int:
        """Bytes of every file put so far (the manifest and markers not counted)."""
        return sum(f["size"] for f in self._files.values())

    @property
    def run_uri(self) -> str:
        """URI of this run's folder: ``<root_uri>/runs/<run_id>``."""
        return join(self.root_uri, RUNS, self.run_id)

    def _begin(self, name: str) -> str:
        if self._state != "open":
            raise CheckpointError(f"run {self.run_uri} is closed (commit() was called): cannot add {name!r}")
        if _check_name(name) in (MANIFEST, SUCCESS):
            raise CheckpointError(f"{name!r} is reserved for the run's own bookkeeping")
        if name in self._files:
            raise CheckpointError(f"file {name!r} was already written to run {self.run_uri}")
        path = join(self._path, name)
        if fs_kind(self._fs) != "object" and "/" in name:
            with guard(join(self.run_uri, name), self._opts, write=True):
                self._fs.makedirs(posixpath.dirname(path), exist_ok=True)
        return path

    def put_bytes(self, name: str, data: bytes) -> None:
        """Write ``data`` as file ``name`` (a relative path). Raises CheckpointError / StorageError."""
        path = self._begin(name)
        with guard(join(self.run_uri, name), self._opts, write=True):
            self._fs.pipe_file(path, bytes(data))
        self._files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}

    def put_json(self, name: str, obj: Any) -> None:
        """Write ``obj`` as JSON (indent=2, sorted keys, trailing newline). Raises CheckpointError / StorageError;
        TypeError / ValueError for an object JSON cannot encode (NaN included)."""
        self.put_bytes(name, json_bytes(obj))

    def put_tensors(self, name: str, tensors: Mapping[str, torch.Tensor],
                    metadata: dict[str, str] | None = None) -> None:
        """Write ``tensors`` as one safetensors file ``name`` and map each key to it in the index. Raises
        CheckpointError for a key already written to this run or tensors safetensors cannot store; StorageError."""
        self._begin(name)
        if dup := sorted(k for k in tensors if k in self._weight_map):
            raise CheckpointError(f"tensor {dup[0]!r} already written to {self._weight_map[dup[0]]!r} in this run")
        try:
            data = st_save(dict(tensors), metadata=metadata)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(one_line(f"cannot serialise tensors for {name!r}: {exc}")) from exc
        self.put_bytes(name, data)
        for k, t in tensors.items():
            self._weight_map[k] = name
            self._total_size += t.numel() * t.element_size()

    def put_file(self, name: str, local_path: str) -> None:
        """Stream the local file ``local_path`` into the run as ``name``. Raises CheckpointError / StorageError."""
        path = self._begin(name)
        try:
            src = open(local_path, "rb")  # noqa: SIM115 - closed by the with below; opened first so that a
            # missing local file is reported as such, not as a storage fault
        except OSError as exc:
            raise CheckpointError(one_line(f"cannot read local file {local_path}: {exc}")) from exc
        with guard(join(self.run_uri, name), self._opts, write=True), src, self._fs.open(path, "wb") as dst:
            digest, size = hash_stream(src, dst)
        self._files[name] = {"sha256": digest, "size": size}

    def commit(self, *, publish: bool = True, index_name: str = INDEX) -> str:
        """Write the tensor index (if any tensors were put), manifest.json, _SUCCESS, then (``publish``) ``latest``.
        Returns the run URI. Raises CheckpointError when called twice or after a failed commit; StorageError."""
        if self._state != "open":
            raise CheckpointError(f"commit() was already called for run {self.run_uri}")
        if self._weight_map:
            self.put_json(index_name, {"metadata": {"total_size": self._total_size}, "weight_map": self._weight_map})
        self._state = "committing"
        manifest = {"format_version": FORMAT_VERSION, "run_id": self.run_id, "files": self._files}
        stamp = {"run_id": self.run_id, "time": datetime.datetime.now(datetime.timezone.utc).isoformat()}
        with guard(self.run_uri, self._opts, write=True):
            self._fs.pipe_file(join(self._path, MANIFEST), json_bytes(manifest))
            self._fs.pipe_file(join(self._path, SUCCESS), json_bytes(stamp))
            if publish:
                put_atomic(self._fs, join(self._root, LATEST), f"{self.run_id}\n".encode())
        self._state = "done"
        return self.run_uri


def resolve_run(uri: str, storage_options: dict | None = None) -> str:
    """Run URI for ``uri``: ``uri`` itself when it holds manifest.json, else ``uri/runs/<id>`` from ``uri/latest``.
    Raises CheckpointError when neither exists (or latest names a run without manifest.json); StorageError."""
    uri = normalise(uri)
    fs, path = url_to_fs(uri, storage_options)
    with guard(uri, storage_options, write=False):
        fs.invalidate_cache()
        if fs.exists(join(path, MANIFEST)):
            return uri
        if not fs.exists(join(path, LATEST)):
            raise CheckpointError(f"no checkpoint at {uri}: neither manifest.json nor latest")
        run_id = fs.cat_file(join(path, LATEST)).decode("utf-8").strip()
        if not run_id or "/" in run_id or run_id in (".", ".."):
            raise CheckpointError(f"{join(uri, LATEST)} holds an invalid run id {run_id!r}")
        run = join(uri, RUNS, run_id)
        if not fs.exists(join(path, RUNS, run_id, MANIFEST)):
            raise CheckpointError(f"{join(uri, LATEST)} names run {run_id!r} but {run} has no manifest.json")
        return run


def verify_run(run_uri: str, storage_options: dict | None = None, *, check_hashes: bool = True,
               hashed: Collection[str] | None = None) -> dict:
    """Check a run's _SUCCESS, manifest format_version (any readable one), and each file's presence, size and
    (``check_hashes``) sha256, the sha256 of the files ``hashed`` names only when given (each must be in the
    manifest). Returns the manifest dict. Raises CheckpointError naming the file and the problem; StorageError."""
    run_uri = normalise(run_uri)
    fs, path = url_to_fs(run_uri, storage_options)
    man_uri = join(run_uri, MANIFEST)
    with guard(run_uri, storage_options, write=False):
        fs.invalidate_cache()
        if not fs.exists(join(path, SUCCESS)):
            raise CheckpointError(f"run {run_uri} has no {SUCCESS}: it is incomplete (a failed or running write)")
        manifest = read_json(man_uri, storage_options)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise CheckpointError(f"{man_uri} is malformed: expected an object with 'files'")
        if manifest.get("format_version") not in READABLE_VERSIONS:
            raise CheckpointError(f"{man_uri} has format_version {manifest.get('format_version')!r}; this "
                                  f"nesta_ray reads {', '.join(map(str, READABLE_VERSIONS))}: upgrade nesta_ray")
        if hashed is not None:
            _check_listed(run_uri, manifest, hashed)
        for rel, ent in sorted(manifest["files"].items()):
            fpath, furi = join(path, _check_name(rel)), join(run_uri, rel)
            if not isinstance(ent, dict) or not {"sha256", "size"} <= ent.keys():
                raise CheckpointError(f"{man_uri}: entry for {rel!r} lacks sha256/size")
            if not fs.exists(fpath):
                raise CheckpointError(f"{furi}: listed in manifest.json but missing")
            if (size := fs.size(fpath)) != ent["size"]:
                raise CheckpointError(f"{furi}: size {size} bytes, manifest.json says {ent['size']}")
        if check_hashes:
            _hash(fs, path, run_uri, manifest, sorted(manifest["files"]) if hashed is None else sorted(hashed))
        return manifest


def _check_listed(run_uri: str, manifest: dict, files: Collection[str]) -> None:
    if unlisted := sorted(set(files) - set(manifest["files"])):
        raise CheckpointError(f"{join(run_uri, MANIFEST)} does not list {unlisted[0]!r}: the run does not vouch for it")


def _hash(fs: Any, path: str, run_uri: str, manifest: dict, files: list[str]) -> None:
    for rel in files:
        with fs.open(join(path, _check_name(rel)), "rb") as f:
            if hash_stream(f)[0] != manifest["files"][rel]["sha256"]:
                raise CheckpointError(f"{join(run_uri, rel)}: sha256 mismatch (file is corrupt or was modified)")


def hash_files(run_uri: str, manifest: dict, files: Collection[str], storage_options: dict | None = None) -> None:
    """Check the sha256 of ``files`` (relative names) against a ``manifest`` that ``verify_run`` returned, so that
    a reader who learns which files it needs only after reading the (verified) index reads the manifest once.
    Raises CheckpointError for a file the manifest does not list or whose hash differs; StorageError."""
    run_uri = normalise(run_uri)
    _check_listed(run_uri, manifest, files)
    fs, path = url_to_fs(run_uri, storage_options)
    with guard(run_uri, storage_options, write=False):
        _hash(fs, path, run_uri, manifest, sorted(files))


def weight_index(run_uri: str, storage_options: dict | None = None) -> str:
    """The name of a run's tensor index: v2's variant name, or a v1 run's Hugging Face one. Raises
    StorageError."""
    fs, path = url_to_fs(run_uri, storage_options)
    with guard(run_uri, storage_options, write=False):
        return INDEX if fs.exists(join(path, INDEX)) else HF_INDEX


def verify_files(run_uri: str, files: Collection[str], storage_options: dict | None = None) -> dict:
    """Check a committed run, the sha256 of ``files`` (relative names; the tensor index is always included) before
    they are read, and that the index names only files the manifest lists; returns the manifest (for
    ``hash_files`` of more files later). Raises CheckpointError / StorageError as ``verify_run``."""
    index = weight_index(run_uri, storage_options)
    manifest = verify_run(run_uri, storage_options, hashed={*files, index})
    index_files(run_uri, manifest, index, storage_options)
    return manifest


def index_files(run_uri: str, manifest: dict, index: str, storage_options: dict | None = None) -> list[str]:
    """The weight files that the run's tensor index ``index`` names, each one its (verified) ``manifest`` lists.
    Raises CheckpointError for an index the manifest does not list, that is not a tensor index, or that names any
    other file (an absolute path, a file outside the run: a loader would read it unverified)."""
    if index not in manifest["files"]:
        raise CheckpointError(f"{join(run_uri, index)} is not listed in {MANIFEST}: the run does not vouch for it")
    raw = read_json(join(run_uri, index), storage_options)
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{join(run_uri, index)} is not a tensor index: expected a weight_map of tensor -> file")
    files = sorted({str(f) for f in weight_map.values()})
    if unlisted := [f for f in files if f not in manifest["files"]]:
        raise CheckpointError(f"{join(run_uri, index)} names the file {unlisted[0][:200]!r}, which {MANIFEST} does "
                              "not list: a run's index may name only the run's own verified files")
    return files


def run_markers(uri: str, storage_options: dict | None = None) -> list[str]:
    """What makes the folder ``uri`` look like a compressed run or output root: its run files (manifest, _SUCCESS,
    nesta.json, latest, runs/, the variant index), a nesta_lowrank config.json, or factor tensors (``*.A``/``*.B``)
    in its safetensors; [] for anything else (a plain model folder, a missing one). Raises StorageError."""
    names = list_names(uri, storage_options)
    found = [n for n in (MANIFEST, SUCCESS, NESTA_JSON, LATEST, INDEX) if n in names]
    fs, path = url_to_fs(uri, storage_options)
    with guard(uri, storage_options, write=False):
        if fs.isdir(join(path, RUNS)):
            found.append(f"{RUNS}/")
    if CONFIG in names:
        with contextlib.suppress(CheckpointError):
            config = read_json(join(uri, CONFIG), storage_options)
            if isinstance(config, dict) and config.get("model_type") == MODEL_TYPE:
                found.append(f"{CONFIG} of model_type {MODEL_TYPE}")
    for name in (n for n in names if n.endswith(".safetensors")):
        with contextlib.suppress(ModelError):
            if factor := next((k for k in tensor_names(join(uri, name), storage_options)
                               if k.endswith((".A", ".B"))), None):
                found.append(f"the factor tensor {factor} in {name}")
                break
    return found


def download_run(run_uri: str, local_dir: str, storage_options: dict | None = None) -> str:
    """Copy a verified run (its files, then manifest.json and _SUCCESS) into ``local_dir`` (created), checking each
    sha256 while copying; returns the absolute local folder, itself a complete run. A run already on the local
    filesystem is verified in place and its own path returned (no copy). Raises CheckpointError / StorageError."""
    fs, path = url_to_fs(run_uri, storage_options)
    if fs_kind(fs) == "local":
        verify_run(run_uri, storage_options, check_hashes=True)
        return path
    manifest = verify_run(run_uri, storage_options, check_hashes=False)
    local_dir = os.path.abspath(local_dir)
    for name in (SUCCESS, MANIFEST):  # a stale earlier copy must not look complete while files are replaced
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(local_dir, name))
    for rel, ent in sorted(manifest["files"].items()):
        dest = os.path.join(local_dir, *rel.split("/"))
        tmp = f"{dest}.partial"
        with guard(join(run_uri, rel), storage_options, write=False):
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with fs.open(join(path, rel), "rb") as src, open(tmp, "wb") as out:
                digest, size = hash_stream(src, out)
        if digest != ent["sha256"] or size != ent["size"]:
            os.remove(tmp)
            raise CheckpointError(f"{join(run_uri, rel)}: sha256/size mismatch while downloading (file is corrupt)")
        os.replace(tmp, dest)
    for name in (MANIFEST, SUCCESS):  # last, so the copy is a complete run only once every file is in place
        with open(os.path.join(local_dir, name), "wb") as out:
            out.write(read_bytes(join(run_uri, name), storage_options))
    return local_dir


def list_runs(root_uri: str, storage_options: dict | None = None) -> list[str]:
    """Sorted run ids (str) under ``root_uri/runs``, complete or not; [] when there are none. Raises StorageError."""
    fs, path = url_to_fs(root_uri, storage_options)
    with guard(root_uri, storage_options, write=False):
        fs.invalidate_cache()
        try:
            entries = fs.ls(join(path, RUNS), detail=True)
        except FileNotFoundError:
            return []
    return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory")


def run_id_of(run_uri: str) -> str:
    """The run id, the last part of a run URI."""
    return run_uri.rstrip("/").rsplit("/", 1)[1]


def published_run(root_uri: str, storage_options: dict | None = None) -> str | None:
    """URI of the run ``latest`` names under ``root_uri``, or None before the first publish. Raises CheckpointError
    when ``latest`` names a run that is not there; StorageError."""
    if LATEST not in list_names(root_uri, storage_options):
        return None
    return resolve_run(root_uri, storage_options)
