"""Files on any fsspec storage (local paths, ``file://``, ``s3://bucket/prefix``, ...): URIs, one-line errors,
pre-flight probes, whole-object reads and atomic writes. The only module that imports fsspec (besides the
checkpoint's run store, which builds on it).

Storage faults (missing bucket, refused credentials, unreachable endpoint) raise ``StorageError``; a missing or
unreadable file raises ``CheckpointError`` naming it.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec

from nesta_ray.errors import CheckpointError, NestaError, StorageError

CHUNK = 8 * 2**20  # streaming hash/copy chunk
_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl", "oss"}
_CRED_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidClientTokenId", "ExpiredToken",
               "InvalidToken", "AccessDenied", "AllAccessDisabled", "403", "Forbidden"}
_CONN_NAMES = {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionRefusedError", "ClientConnectorError",
               "ServerDisconnectedError", "ProxyConnectionError", "ReadTimeoutError", "FSTimeoutError"}
# Merged under the caller's s3 config_kwargs in check_storage (caller's keys win): fail in seconds, not minutes.
_FAST_FAIL = {"connect_timeout": 3, "read_timeout": 5, "retries": {"max_attempts": 1, "mode": "standard"}}
_PROBE_TIMEOUT_S = 8


def normalise(uri: str) -> str:
    """A plain local path made absolute, without a trailing slash; a URI with a scheme only loses trailing '/'."""
    if "://" not in uri and "::" not in uri:
        return os.path.abspath(os.path.expanduser(uri))
    stripped = uri.rstrip("/")
    return uri if stripped.endswith(":") else stripped


def url_to_fs(uri: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``fsspec.core.url_to_fs`` with local paths made absolute: returns (filesystem, path inside it).
    Raises StorageError for an unknown protocol or a missing fsspec backend."""
    try:
        return fsspec.core.url_to_fs(normalise(uri), **(storage_options or {}))
    except (ValueError, ImportError) as exc:
        raise StorageError(one_line(f"{uri}: unsupported storage URI: {exc}")) from exc
    except (OSError, EOFError) as exc:  # filesystems that connect when opened (ftp, sftp, smb, ...)
        raise StorageError(one_line(f"{uri}: cannot connect to {_host(uri)} ({type(exc).__name__}: "
                                    f"{_cut(exc)}): check the host and port and that the server is running")) from exc
    except TypeError as exc:  # a storage option the filesystem does not take
        raise StorageError(one_line(f"{uri}: the storage options do not fit this filesystem ({_cut(exc)}): check "
                                    "storage_options")) from exc


def _host(uri: str) -> str:
    """The host[:port] of a URI, without its userinfo."""
    return uri.partition("://")[2].split("/")[0].rpartition("@")[2] or uri


def _cut(exc: BaseException, limit: int = 300) -> str:
    """A third-party exception's text, at most ``limit`` characters (some quote every path they tried)."""
    text = str(exc)
    return text if len(text) <= limit else f"{text[:limit]}..."


def unknown_options(uri: str, storage_options: dict | None) -> list[str]:
    """The storage options that the S3 filesystem of ``uri`` would ignore without a word (s3fs passes unknown ones on
    to fsspec's base class, which drops them); [] for other filesystems, whose extra options go to their clients."""
    protocol = uri.partition("://")[0] if "://" in uri else "file"
    if protocol not in ("s3", "s3a") or not storage_options:
        return []
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except (ValueError, ImportError):
        return []  # url_to_fs names the missing backend
    known = {"use_listings_cache", "listings_expiry_time", "max_paths", "skip_instance_cache"}
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            known |= {n for n, p in inspect.signature(klass.__init__).parameters.items()
                      if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return sorted(str(k) for k in storage_options if k not in known)


def join(uri: str, *parts: str) -> str:
    """Join path segments onto a URI (str), keeping its scheme and never doubling slashes."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        rest = uri
    segs = [s for p in parts for s in p.split("/") if s]
    base = rest.rstrip("/")
    out = "/".join([base, *segs]) if base else ("/" if rest.startswith("/") else "") + "/".join(segs)
    return f"{scheme}://{out}" if sep else out


def one_line(msg: str) -> str:
    return " ".join(msg.split())


def fs_kind(fs: fsspec.AbstractFileSystem) -> str:
    """'local', 'object' (s3/gcs/azure: no folders, mkdir would create buckets) or 'other'."""
    protos = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    return "local" if protos & {"file", "local"} else "object" if protos & _OBJECT_STORES else "other"


def _no_bucket(uri: str, *, write: bool) -> StorageError:
    return StorageError(f"{uri}: bucket '{uri.partition('://')[2].split('/')[0]}' does not exist: create it or fix "
                        f"{'output.uri' if write else 'the URI'}")


def _classify(uri: str, exc: BaseException, storage_options: dict | None, *, write: bool) -> StorageError | None:
    """A one-line StorageError for a missing bucket, refused credentials or an unreachable endpoint, else None."""
    chain: list[BaseException] = []  # the exception and what it was raised from / during
    e: BaseException | None = exc
    while e is not None and e not in chain and len(chain) < 20:
        chain, e = [*chain, e], e.__cause__ or e.__context__
    responses = [getattr(e, "response", None) for e in chain]
    codes = {str(r.get("Error", {}).get("Code")) for r in responses if isinstance(r, dict)}
    names = {type(e).__name__ for e in chain}
    text = " ".join(str(e) for e in chain).lower()
    if "NoSuchBucket" in codes or "specified bucket does not exist" in text:
        return _no_bucket(uri, write=write)
    cred = codes & _CRED_CODES or names & {"NoCredentialsError", "PartialCredentialsError"}
    if cred:
        return StorageError(f"{uri}: storage refused the credentials ({sorted(cred)[0]}): check AWS_ACCESS_KEY_ID/"
                            "AWS_SECRET_ACCESS_KEY (or storage_options key/secret) and that they may "
                            f"{'write' if write else 'read'} there")
    if (names & _CONN_NAMES or "could not connect to the endpoint" in text) and uri.split("://")[0] not in \
            _OBJECT_STORES:
        return StorageError(f"{uri}: cannot reach {_host(uri)} (no connection or no answer): check the URI and that "
                            "the server is running")
    if names & _CONN_NAMES or "could not connect to the endpoint" in text:
        so = storage_options or {}
        ep = (so.get("client_kwargs") or {}).get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL") or "(default)"
        return StorageError(f"{uri}: cannot reach the storage endpoint {ep} (no connection or no answer): check "
                            "client_kwargs.endpoint_url / AWS_ENDPOINT_URL and that the service is running")
    if any(isinstance(e, PermissionError) for e in chain):
        return StorageError(one_line(f"{uri}: permission denied ({exc}): fix the permissions or choose another URI"))
    return None


@contextlib.contextmanager
def guard(uri: str, storage_options: dict | None, *, write: bool) -> Iterator[None]:
    """Re-raise I/O failures as StorageError (storage at fault) or CheckpointError naming ``uri``."""
    try:
        yield
    except NestaError:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes one actionable line
        err: StorageError | CheckpointError | None = _classify(uri, exc, storage_options, write=write)
        if err is None and isinstance(exc, FileNotFoundError) and not write:
            err = CheckpointError(f"{uri} does not exist")
        raise err or CheckpointError(one_line(f"cannot {'write' if write else 'read'} {uri}: "
                                           f"{type(exc).__name__}: {exc}")) from exc


def check_storage(uri: str, storage_options: dict | None = None, *, write: bool) -> None:
    """Preflight before any compute: with ``write`` prove a probe object can be written then deleted under
    ``uri``; without it, prove ``uri`` exists and is readable. Raises StorageError (one line: URI and fix)."""
    opts = dict(storage_options or {})
    fs, path = url_to_fs(uri, opts)
    if fs_kind(fs) == "object" and "s3" in fs.protocol:
        opts["config_kwargs"] = {**_FAST_FAIL, **(opts.get("config_kwargs") or {})}
        fs, path = url_to_fs(uri, {**opts, "skip_instance_cache": True})
        fs.retries = 1  # a private instance: s3fs's own retry loop (5 tries with backoff) off for the probe
    # Overall deadline per call on async filesystems (e.g. an endpoint that accepts but never answers).
    kw = {"timeout": _PROBE_TIMEOUT_S} if getattr(fs, "async_impl", False) else {}
    try:
        if write:
            if fs_kind(fs) != "object":
                fs.makedirs(path, exist_ok=True)
            probe = join(path, f".nesta-probe-{uuid.uuid4().hex}")
            fs.pipe_file(probe, b"", **kw)
            fs.rm_file(probe, **kw)
        else:
            fs.invalidate_cache()
            if fs_kind(fs) == "object":
                try:
                    fs.info(path.split("/")[0], **kw)  # HEAD on the bucket: a 404 here means no such bucket
                except FileNotFoundError as exc:
                    raise _no_bucket(uri, write=False) from exc
            fs.info(path, **kw)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one actionable line
        if isinstance(exc, StorageError):
            raise
        msg = f"{uri} does not exist: fix the URI" if isinstance(exc, FileNotFoundError) and not write else one_line(
            f"{uri}: cannot {'write' if write else 'read'}: {type(exc).__name__}: {exc}")
        raise _classify(uri, exc, opts, write=write) or StorageError(msg) from exc


def check_protocol(uri: str) -> None:
    """Raise StorageError unless fsspec has an installed filesystem for ``uri``'s scheme (nothing is reached)."""
    try:
        fsspec.get_filesystem_class(uri.partition("://")[0] if "://" in uri else "file")
    except (ValueError, ImportError) as exc:
        raise StorageError(one_line(f"{uri}: unsupported storage URI: {_cut(exc)}")) from exc


def check_local_output(uri: str) -> str:
    """Check, without creating anything, that a local output root can be written: it is a folder, or its nearest
    existing parent is a writable folder. Returns what was found; raises StorageError naming the fix."""
    path = normalise(uri.removeprefix("file://"))
    if os.path.exists(path) and not os.path.isdir(path):
        raise StorageError(f"{uri} is a file: output.uri names the folder the runs go under; choose another path")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise StorageError(f"{uri}: {existing} is a file, so no folder can be made under it: choose another "
                           "output.uri")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StorageError(f"{uri}: {existing} is not writable: fix its permissions or choose another output.uri")
    return "writable folder" if existing == path else f"would be created in {existing} (writable)"


def hash_stream(src: Any, dst: Any = None) -> tuple[str, int]:
    """(sha256 hex, byte count) of a binary stream read in CHUNK pieces, copying each piece to ``dst``."""
    h, size = hashlib.sha256(), 0
    while chunk := src.read(CHUNK):
        h.update(chunk)
        size += len(chunk)
        if dst is not None:
            dst.write(chunk)
    return h.hexdigest(), size


def json_bytes(obj: Any) -> bytes:
    """``obj`` as strict JSON (indent 2, sorted keys, trailing newline) in UTF-8; ValueError for NaN/Inf."""
    return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


def put_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` at ``path`` of ``fs`` so readers see the old content or the new, never a part."""
    if fs_kind(fs) == "local":  # write aside and rename: a crash never leaves a half-written file
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
    with guard(uri, storage_options, write=True):
        put_atomic(fs, path, bytes(data))


def list_names(uri: str, storage_options: dict | None = None) -> list[str]:
    """Sorted names of the files directly under ``uri``; [] when it does not exist. Raises StorageError."""
    fs, path = url_to_fs(uri, storage_options)
    with guard(uri, storage_options, write=False):
        fs.invalidate_cache()
        try:
            entries = fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
    return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "file")


def remove_tree(uri: str, storage_options: dict | None = None) -> None:
    """Delete ``uri`` and everything under it; nothing happens when it does not exist. Raises StorageError."""
    fs, path = url_to_fs(uri, storage_options)
    with guard(uri, storage_options, write=True):
        fs.invalidate_cache()
        if fs.exists(path):
            fs.rm(path, recursive=True)


def read_bytes(uri: str, storage_options: dict | None = None) -> bytes:
    """Whole content of one file. Raises CheckpointError (missing/unreadable) or StorageError (storage fault)."""
    fs, path = url_to_fs(uri, storage_options)
    with guard(uri, storage_options, write=False):
        return fs.cat_file(path)


def read_json(uri: str, storage_options: dict | None = None) -> Any:
    """Parsed JSON content of one file. Raises CheckpointError (missing or invalid JSON) or StorageError."""
    try:
        return json.loads(read_bytes(uri, storage_options))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(one_line(f"{uri} is not valid JSON: {exc}")) from exc
