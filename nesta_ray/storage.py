"""Run folders on any fsspec storage (local paths, ``file://``, ``s3://bucket/prefix``, ...). Layout under a root R::

    R/latest                       the published run id (written last, only by a successful publish)
    R/runs/<run_id>/...            every file of the run
    R/runs/<run_id>/manifest.json  {"format_version": 1, "run_id": ..., "files": {relpath: {"sha256", "size"}}}
    R/runs/<run_id>/_SUCCESS       written after manifest.json; a run without it is never read

A failure part-way through a run leaves earlier runs and ``latest`` untouched. Storage faults (missing bucket,
refused credentials, unreachable endpoint) raise ``StorageError``; missing, incomplete or corrupt runs raise
``CheckpointError``. Tensors are serialised with ``safetensors.torch.save`` to bytes; all I/O goes through fsspec.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import posixpath
import uuid
from typing import Any, Iterator, Mapping

import fsspec
import torch
from safetensors.torch import save as _st_save

from nesta_ray.errors import CheckpointError, StorageError

FORMAT_VERSION: int = 1
MANIFEST, SUCCESS, LATEST = "manifest.json", "_SUCCESS", "latest"
CHUNK = 8 * 2**20  # streaming hash/copy chunk
_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl", "oss"}
_CRED_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidClientTokenId", "ExpiredToken",
               "InvalidToken", "AccessDenied", "AllAccessDisabled", "403", "Forbidden"}
_CONN_NAMES = {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionRefusedError", "ClientConnectorError",
               "ServerDisconnectedError", "ProxyConnectionError", "ReadTimeoutError", "FSTimeoutError"}
# Merged under the caller's s3 config_kwargs in check_storage (caller's keys win): fail in seconds, not minutes.
_FAST_FAIL = {"connect_timeout": 3, "read_timeout": 5, "retries": {"max_attempts": 1, "mode": "standard"}}
_PROBE_TIMEOUT_S = 8


def _norm(uri: str) -> str:
    """A plain local path made absolute, without a trailing slash; a URI with a scheme only loses trailing '/'."""
    if "://" not in uri and "::" not in uri:
        return os.path.abspath(os.path.expanduser(uri))
    stripped = uri.rstrip("/")
    return uri if stripped.endswith(":") else stripped


def url_to_fs(uri: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``fsspec.core.url_to_fs`` with local paths made absolute: returns (filesystem, path inside it).
    Raises StorageError for an unknown protocol or a missing fsspec backend."""
    try:
        return fsspec.core.url_to_fs(_norm(uri), **(storage_options or {}))
    except (ValueError, ImportError) as exc:
        raise StorageError(_line(f"{uri}: unsupported storage URI: {exc}")) from exc


def join(uri: str, *parts: str) -> str:
    """Join path segments onto a URI (str), keeping its scheme and never doubling slashes."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        rest = uri
    segs = [s for p in parts for s in p.split("/") if s]
    base = rest.rstrip("/")
    out = "/".join([base, *segs]) if base else ("/" if rest.startswith("/") else "") + "/".join(segs)
    return f"{scheme}://{out}" if sep else out


def _line(msg: str) -> str:
    return " ".join(msg.split())


def _kind(fs: fsspec.AbstractFileSystem) -> str:
    """'local', 'object' (s3/gcs/azure: no folders, mkdir would create buckets) or 'other'."""
    protos = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    return "local" if protos & {"file", "local"} else "object" if protos & _OBJECT_STORES else "other"


def _no_bucket(uri: str, *, write: bool) -> StorageError:
    return StorageError(f"{uri}: bucket '{uri.partition('://')[2].split('/')[0]}' does not exist: create it or fix "
                        f"{'output.uri' if write else 'the URI'}")


def _classify(uri: str, exc: BaseException, storage_options: dict | None, *, write: bool) -> StorageError | None:
    """A one-line StorageError for a missing bucket, refused credentials or an unreachable endpoint, else None."""
    chain, e = [], exc  # the exception and what it was raised from / during
    while e is not None and e not in chain and len(chain) < 20:
        chain, e = [*chain, e], e.__cause__ or e.__context__
    codes = {str(e.response.get("Error", {}).get("Code")) for e in chain if isinstance(getattr(e, "response", 0), dict)}
    names = {type(e).__name__ for e in chain}
    text = " ".join(str(e) for e in chain).lower()
    if "NoSuchBucket" in codes or "specified bucket does not exist" in text:
        return _no_bucket(uri, write=write)
    cred = codes & _CRED_CODES or names & {"NoCredentialsError", "PartialCredentialsError"}
    if cred:
        return StorageError(f"{uri}: storage refused the credentials ({sorted(cred)[0]}): check AWS_ACCESS_KEY_ID/"
                            "AWS_SECRET_ACCESS_KEY (or storage_options key/secret) and that they may "
                            f"{'write' if write else 'read'} there")
    if names & _CONN_NAMES or "could not connect to the endpoint" in text:
        so = storage_options or {}
        ep = (so.get("client_kwargs") or {}).get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL") or "(default)"
        return StorageError(f"{uri}: cannot reach the storage endpoint {ep} (no connection or no answer): check "
                            "client_kwargs.endpoint_url / AWS_ENDPOINT_URL and that the service is running")
    if any(isinstance(e, PermissionError) for e in chain):
        return StorageError(_line(f"{uri}: permission denied ({exc}): fix the permissions or choose another URI"))
    return None


@contextlib.contextmanager
def _guard(uri: str, storage_options: dict | None, *, write: bool) -> Iterator[None]:
    """Re-raise I/O failures as StorageError (storage at fault) or CheckpointError naming ``uri``."""
    try:
        yield
    except (StorageError, CheckpointError):
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes one actionable line
        err = _classify(uri, exc, storage_options, write=write)
        if err is None and isinstance(exc, FileNotFoundError) and not write:
            err = CheckpointError(f"{uri} does not exist")
        raise err or CheckpointError(_line(f"cannot {'write' if write else 'read'} {uri}: "
                                           f"{type(exc).__name__}: {exc}")) from exc


def check_storage(uri: str, storage_options: dict | None = None, *, write: bool) -> None:
    """Preflight before any compute: with ``write`` prove a probe object can be written then deleted under
    ``uri``; without it, prove ``uri`` exists and is readable. Raises StorageError (one line: URI and fix)."""
    opts = dict(storage_options or {})
    fs, path = url_to_fs(uri, opts)
    if _kind(fs) == "object" and "s3" in fs.protocol:
        opts["config_kwargs"] = {**_FAST_FAIL, **(opts.get("config_kwargs") or {})}
        fs, path = url_to_fs(uri, {**opts, "skip_instance_cache": True})
        fs.retries = 1  # a private instance: s3fs's own retry loop (5 tries with backoff) off for the probe
    # Overall deadline per call on async filesystems (e.g. an endpoint that accepts but never answers).
    kw = {"timeout": _PROBE_TIMEOUT_S} if getattr(fs, "async_impl", False) else {}
    try:
        if write:
            if _kind(fs) != "object":
                fs.makedirs(path, exist_ok=True)
            probe = join(path, f".nesta-probe-{uuid.uuid4().hex}")
            fs.pipe_file(probe, b"", **kw)
            fs.rm_file(probe, **kw)
        else:
            fs.invalidate_cache()
            if _kind(fs) == "object":
                try:
                    fs.info(path.split("/")[0], **kw)  # HEAD on the bucket: a 404 here means no such bucket
                except FileNotFoundError as exc:
                    raise _no_bucket(uri, write=False) from exc
            fs.info(path, **kw)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one actionable line
        if isinstance(exc, StorageError):
            raise
        msg = f"{uri} does not exist: fix the URI" if isinstance(exc, FileNotFoundError) and not write else _line(
            f"{uri}: cannot {'write' if write else 'read'}: {type(exc).__name__}: {exc}")
        raise _classify(uri, exc, opts, write=write) or StorageError(msg) from exc


def _check_name(name: str) -> str:
    if not name or name.startswith("/") or "\\" in name or any(s in ("", ".", "..") for s in name.split("/")):
        raise CheckpointError(f"invalid file name {name!r}: use a relative path without '.', '..' or empty parts")
    return name


def _hash_stream(src: Any, dst: Any = None) -> tuple[str, int]:
    """(sha256 hex, byte count) of a binary stream read in CHUNK pieces, copying each piece to ``dst``."""
    h, size = hashlib.sha256(), 0
    while chunk := src.read(CHUNK):
        h.update(chunk)
        size += len(chunk)
        if dst is not None:
            dst.write(chunk)
    return h.hexdigest(), size


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


class RunWriter:
    """Writes one run under ``root_uri/runs/<run_id>``; nothing is readable until ``commit()``."""

    def __init__(self, root_uri: str, run_id: str, storage_options: dict | None = None) -> None:
        """Raises CheckpointError for an invalid run id or one already committed under root_uri; StorageError."""
        if not run_id or "/" in run_id or run_id in (".", "..") or run_id != run_id.strip():
            raise CheckpointError(f"invalid run id {run_id!r}: use a non-empty name without '/'")
        self.root_uri, self.run_id, self._opts = _norm(root_uri), run_id, storage_options
        self._fs, self._root = url_to_fs(self.root_uri, storage_options)
        self._path = join(self._root, "runs", run_id)
        self._files: dict[str, dict[str, Any]] = {}  # relpath -> {"sha256", "size"}
        self._weight_map: dict[str, str] = {}  # tensor key -> relpath
        self._total_size, self._state = 0, "open"
        with _guard(self.run_uri, storage_options, write=True):
            self._fs.invalidate_cache()
            if self._fs.exists(join(self._path, SUCCESS)):
                raise CheckpointError(f"run {self.run_uri} is already committed: choose another run id")
            if _kind(self._fs) != "object":
                self._fs.makedirs(self._path, exist_ok=True)

    @property
    def bytes_written(self) -> int:
        """Bytes of every file put so far (the manifest and markers not counted)."""
        return sum(f["size"] for f in self._files.values())

    @property
    def run_uri(self) -> str:
        """URI of this run's folder: ``<root_uri>/runs/<run_id>``."""
        return join(self.root_uri, "runs", self.run_id)

    def _begin(self, name: str) -> str:
        if self._state != "open":
            raise CheckpointError(f"run {self.run_uri} is closed (commit() was called): cannot add {name!r}")
        if _check_name(name) in (MANIFEST, SUCCESS):
            raise CheckpointError(f"{name!r} is reserved for the run's own bookkeeping")
        if name in self._files:
            raise CheckpointError(f"file {name!r} was already written to run {self.run_uri}")
        path = join(self._path, name)
        if _kind(self._fs) != "object" and "/" in name:
            with _guard(join(self.run_uri, name), self._opts, write=True):
                self._fs.makedirs(posixpath.dirname(path), exist_ok=True)
        return path

    def put_bytes(self, name: str, data: bytes) -> None:
        """Write ``data`` as file ``name`` (a relative path). Raises CheckpointError / StorageError."""
        path = self._begin(name)
        with _guard(join(self.run_uri, name), self._opts, write=True):
            self._fs.pipe_file(path, bytes(data))
        self._files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}

    def put_json(self, name: str, obj: Any) -> None:
        """Write ``obj`` as JSON (indent=2, sorted keys, trailing newline). Raises CheckpointError / StorageError;
        TypeError / ValueError for an object JSON cannot encode (NaN included)."""
        self.put_bytes(name, _dumps(obj))

    def put_tensors(self, name: str, tensors: Mapping[str, torch.Tensor],
                    metadata: dict[str, str] | None = None) -> None:
        """Write ``tensors`` as one safetensors file ``name`` and map each key to it in the index. Raises
        CheckpointError for a key already written to this run or tensors safetensors cannot store; StorageError."""
        self._begin(name)
        if dup := sorted(k for k in tensors if k in self._weight_map):
            raise CheckpointError(f"tensor {dup[0]!r} already written to {self._weight_map[dup[0]]!r} in this run")
        try:
            data = _st_save(dict(tensors), metadata=metadata)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(_line(f"cannot serialise tensors for {name!r}: {exc}")) from exc
        self.put_bytes(name, data)
        for k, t in tensors.items():
            self._weight_map[k] = name
            self._total_size += t.numel() * t.element_size()

    def put_file(self, name: str, local_path: str) -> None:
        """Stream the local file ``local_path`` into the run as ``name``. Raises CheckpointError / StorageError."""
        path = self._begin(name)
        try:
            src = open(local_path, "rb")
        except OSError as exc:
            raise CheckpointError(_line(f"cannot read local file {local_path}: {exc}")) from exc
        with _guard(join(self.run_uri, name), self._opts, write=True), src, self._fs.open(path, "wb") as dst:
            digest, size = _hash_stream(src, dst)
        self._files[name] = {"sha256": digest, "size": size}

    def commit(self, *, publish: bool = True, index_name: str = "model.safetensors.index.json") -> str:
        """Write the tensor index (if any tensors were put), manifest.json, _SUCCESS, then (``publish``) ``latest``.
        Returns the run URI. Raises CheckpointError when called twice or after a failed commit; StorageError."""
        if self._state != "open":
            raise CheckpointError(f"commit() was already called for run {self.run_uri}")
        if self._weight_map:
            self.put_json(index_name, {"metadata": {"total_size": self._total_size}, "weight_map": self._weight_map})
        self._state = "committing"
        manifest = {"format_version": FORMAT_VERSION, "run_id": self.run_id, "files": self._files}
        stamp = {"run_id": self.run_id, "time": datetime.datetime.now(datetime.timezone.utc).isoformat()}
        with _guard(self.run_uri, self._opts, write=True):
            self._fs.pipe_file(join(self._path, MANIFEST), _dumps(manifest))
            self._fs.pipe_file(join(self._path, SUCCESS), _dumps(stamp))
            if publish:
                _put_atomic(self._fs, join(self._root, LATEST), f"{self.run_id}\n".encode())
        self._state = "done"
        return self.run_uri


def _put_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    if _kind(fs) == "local":  # write aside and rename: a crash never leaves a half-written file
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        fs.pipe_file(tmp, data)
        os.replace(tmp, path)
    else:  # a single PUT is atomic on object stores
        fs.pipe_file(path, data)


def put_object(uri: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write one whole file atomically (readers see the old content or the new, never a part). Raises StorageError
    or CheckpointError."""
    fs, path = url_to_fs(uri, storage_options)
    with _guard(uri, storage_options, write=True):
        _put_atomic(fs, path, bytes(data))


def list_names(uri: str, storage_options: dict | None = None) -> list[str]:
    """Sorted names of the files directly under ``uri``; [] when it does not exist. Raises StorageError."""
    fs, path = url_to_fs(uri, storage_options)
    with _guard(uri, storage_options, write=False):
        fs.invalidate_cache()
        try:
            entries = fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
    return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "file")


def remove_tree(uri: str, storage_options: dict | None = None) -> None:
    """Delete ``uri`` and everything under it; nothing happens when it does not exist. Raises StorageError."""
    fs, path = url_to_fs(uri, storage_options)
    with _guard(uri, storage_options, write=True):
        fs.invalidate_cache()
        if fs.exists(path):
            fs.rm(path, recursive=True)


def read_bytes(uri: str, storage_options: dict | None = None) -> bytes:
    """Whole content of one file. Raises CheckpointError (missing/unreadable) or StorageError (storage fault)."""
    fs, path = url_to_fs(uri, storage_options)
    with _guard(uri, storage_options, write=False):
        return fs.cat_file(path)


def read_json(uri: str, storage_options: dict | None = None) -> Any:
    """Parsed JSON content of one file. Raises CheckpointError (missing or invalid JSON) or StorageError."""
    try:
        return json.loads(read_bytes(uri, storage_options))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(_line(f"{uri} is not valid JSON: {exc}")) from exc


def resolve_run(uri: str, storage_options: dict | None = None) -> str:
    """Run URI for ``uri``: ``uri`` itself when it holds manifest.json, else ``uri/runs/<id>`` from ``uri/latest``.
    Raises CheckpointError when neither exists (or latest names a run without manifest.json); StorageError."""
    uri = _norm(uri)
    fs, path = url_to_fs(uri, storage_options)
    with _guard(uri, storage_options, write=False):
        fs.invalidate_cache()
        if fs.exists(join(path, MANIFEST)):
            return uri
        if not fs.exists(join(path, LATEST)):
            raise CheckpointError(f"no checkpoint at {uri}: neither manifest.json nor latest")
        run_id = fs.cat_file(join(path, LATEST)).decode("utf-8").strip()
        if not run_id or "/" in run_id or run_id in (".", ".."):
            raise CheckpointError(f"{join(uri, LATEST)} holds an invalid run id {run_id!r}")
        run = join(uri, "runs", run_id)
        if not fs.exists(join(path, "runs", run_id, MANIFEST)):
            raise CheckpointError(f"{join(uri, LATEST)} names run {run_id!r} but {run} has no manifest.json")
        return run


def verify_run(run_uri: str, storage_options: dict | None = None, *, check_hashes: bool = True) -> dict:
    """Check a run's _SUCCESS, manifest format_version, and each file's presence, size and (``check_hashes``)
    sha256. Returns the manifest dict. Raises CheckpointError naming the file and the problem; StorageError."""
    run_uri = _norm(run_uri)
    fs, path = url_to_fs(run_uri, storage_options)
    man_uri = join(run_uri, MANIFEST)
    with _guard(run_uri, storage_options, write=False):
        fs.invalidate_cache()
        if not fs.exists(join(path, SUCCESS)):
            raise CheckpointError(f"run {run_uri} has no {SUCCESS}: it is incomplete (a failed or running write)")
        manifest = read_json(man_uri, storage_options)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise CheckpointError(f"{man_uri} is malformed: expected an object with 'files'")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{man_uri} has format_version {manifest.get('format_version')!r}; "
                                  f"this nesta_ray reads {FORMAT_VERSION}")
        for rel, ent in sorted(manifest["files"].items()):
            fpath, furi = join(path, _check_name(rel)), join(run_uri, rel)
            if not isinstance(ent, dict) or not {"sha256", "size"} <= ent.keys():
                raise CheckpointError(f"{man_uri}: entry for {rel!r} lacks sha256/size")
            if not fs.exists(fpath):
                raise CheckpointError(f"{furi}: listed in manifest.json but missing")
            if (size := fs.size(fpath)) != ent["size"]:
                raise CheckpointError(f"{furi}: size {size} bytes, manifest.json says {ent['size']}")
            if check_hashes:
                with fs.open(fpath, "rb") as f:
                    if _hash_stream(f)[0] != ent["sha256"]:
                        raise CheckpointError(f"{furi}: sha256 mismatch (file is corrupt or was modified)")
        return manifest


def download_run(run_uri: str, local_dir: str, storage_options: dict | None = None) -> str:
    """Copy a verified run (its files, then manifest.json and _SUCCESS) into ``local_dir`` (created), checking each
    sha256 while copying; returns the absolute local folder, itself a complete run. A run already on the local
    filesystem is verified in place and its own path returned (no copy). Raises CheckpointError / StorageError."""
    fs, path = url_to_fs(run_uri, storage_options)
    if _kind(fs) == "local":
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
        with _guard(join(run_uri, rel), storage_options, write=False):
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with fs.open(join(path, rel), "rb") as src, open(tmp, "wb") as out:
                digest, size = _hash_stream(src, out)
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
    with _guard(root_uri, storage_options, write=False):
        fs.invalidate_cache()
        try:
            entries = fs.ls(join(path, "runs"), detail=True)
        except FileNotFoundError:
            return []
    return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory")
