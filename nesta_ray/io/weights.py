"""The safetensors tensors of a model folder, local or on any fsspec storage, read tensor by tensor.

A ``WeightStore`` reads the index (or the single ``model.safetensors``) and each file's header once: 8 bytes of
length, then the JSON header, which names every tensor with its dtype, shape and byte offsets. Tensors are then
read one by one: memory-mapped for a local folder, by ranged reads (``cat_file(path, start, end)``) on remote
storage, so a layer shard fetches the bytes of its own tensors and never copies the whole model. ``bytes_read``
counts what was fetched (headers included).

Nothing is taken on trust: the index must name files inside the folder (relative, no ``..``), and each header's
tensors must lie within their file, one after another, each as long as its dtype and shape say (a truncated or
padded file is refused before any tensor is read).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch

from nesta_ray.errors import ModelError
from nesta_ray.io.storage import fs_kind, guard, join, normalise, url_to_fs

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"
_HEADER_LIMIT = 100 << 20  # a safetensors header larger than this is not one
_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies: its file (relative to the folder), dtype name, shape and absolute byte range."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class WeightStore:
    """Every tensor of the safetensors files under ``uri`` (a local folder or an fsspec URI) that the tensor
    index named ``index`` lists (else the single ``model.safetensors``). Picklable (the filesystem is opened lazily
    in each process). Raises ModelError when the folder holds no safetensors or a header is malformed,
    StorageError / CheckpointError for storage faults."""

    def __init__(self, uri: str, storage_options: dict | None = None, index: str = INDEX) -> None:
        self.uri, self.storage_options, self.index = normalise(uri), storage_options, index
        self.bytes_read = 0
        self._fs: Any = None
        self.headers: dict[str, bytes] = {}  # file -> its raw JSON header (for fingerprints)
        self.entries = self._read_entries()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None}

    @property
    def fs(self) -> Any:
        if self._fs is None:
            self._fs = url_to_fs(self.uri, self.storage_options)[0]
        return self._fs

    @property
    def local(self) -> bool:
        return fs_kind(self.fs) == "local"

    def _path(self, file: str) -> str:
        return url_to_fs(join(self.uri, file), self.storage_options)[1]

    def _read_entries(self) -> dict[str, TensorEntry]:
        index_uri = join(self.uri, self.index)
        with guard(self.uri, self.storage_options, write=False):
            if self.fs.exists(self._path(self.index)):
                raw = self.fs.cat_file(self._path(self.index))
                self.bytes_read += len(raw)
                files = _index_files(raw, index_uri)
            elif self.fs.exists(self._path(SINGLE)):
                files = [SINGLE]
            else:
                raise ModelError(f"{self.uri} holds neither {SINGLE} nor {self.index}")
        entries: dict[str, TensorEntry] = {}
        for file in files:
            entries.update(self._header(file))
        if not entries:
            raise ModelError(f"{index_uri}: no tensors")
        return entries

    def _header(self, file: str) -> dict[str, TensorEntry]:
        path = self._path(file)
        where = join(self.uri, file)
        with guard(where, self.storage_options, write=False):
            length = self.fs.size(path)
            size = int.from_bytes(self.fs.cat_file(path, start=0, end=8), "little")
            if not 0 < size <= min(_HEADER_LIMIT, length - 8):
                raise ModelError(f"{where} is not a safetensors file (header length {size}, file {length} bytes)")
            raw = self.fs.cat_file(path, start=8, end=8 + size)
        self.bytes_read += 8 + len(raw)
        self.headers[file] = raw
        try:
            header = json.loads(raw)
            entries = {k: TensorEntry(file, v["dtype"], tuple(int(d) for d in v["shape"]),
                                      8 + size + int(v["data_offsets"][0]), 8 + size + int(v["data_offsets"][1]))
                       for k, v in header.items() if k != "__metadata__"}
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            raise ModelError(f"{where} has a malformed safetensors header ({type(err).__name__}: {err})") from None
        _check_layout(entries, 8 + size, length, where)
        return entries

    def keys(self) -> list[str]:
        return sorted(self.entries)

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors (each a writable tensor of its stored dtype and shape). Raises KeyError for an
        unknown name; ModelError for a dtype nesta_ray cannot read; storage errors as one line."""
        if self.local:
            return self._read_local(keys)
        spans = _spans([(k, self.entries[k]) for k in keys])
        with guard(self.uri, self.storage_options, write=False):
            blobs = self.fs.cat_ranges([self._path(f) for f, _, _, _ in spans], [s for _, s, _, _ in spans],
                                       [e for _, _, e, _ in spans])  # concurrent on async stores (s3fs)
            for blob in blobs:
                if isinstance(blob, Exception):
                    raise blob
        out = {}
        for (_, start, _, members), blob in zip(spans, blobs):
            self.bytes_read += len(blob)
            for key, e in members:
                out[key] = _tensor(bytearray(blob[e.start - start : e.end - start]), e, key)
        return out

    def _read_local(self, keys: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        for file in sorted({self.entries[k].file for k in keys}):
            with safe_open(self._path(file), "pt") as f:
                for key in keys:
                    if self.entries[key].file == file:
                        out[key] = f.get_tensor(key)
                        self.bytes_read += self.entries[key].nbytes
        return out

    def read_prefix(self, prefix: str, exclude: str | None = None) -> dict[str, torch.Tensor]:
        """Every tensor whose name starts with ``prefix`` (and not with ``exclude``), keyed without the prefix."""
        keys = [k for k in self.keys() if k.startswith(prefix) and not (exclude and k.startswith(exclude))]
        return {k[len(prefix):]: t for k, t in self.read(keys).items()}

    def fingerprint(self, config: bytes) -> str:
        """Cheap identity of the model: sha256 over its config.json bytes and every weight file's name and header
        (which names each tensor with its dtype, shape and offsets), without reading the weights."""
        digest = hashlib.sha256(config)
        for file in sorted(self.headers):
            digest.update(file.encode() + b"\0" + self.headers[file])
        return digest.hexdigest()


def tensor_names(file_uri: str, storage_options: dict | None = None) -> list[str]:
    """The tensor names in the header of one safetensors file (only its header is read). Raises ModelError for a
    file that is not safetensors; StorageError / CheckpointError for storage faults."""
    fs, path = url_to_fs(file_uri, storage_options)
    with guard(file_uri, storage_options, write=False):
        size = int.from_bytes(fs.cat_file(path, start=0, end=8), "little")
        raw = fs.cat_file(path, start=8, end=8 + size) if 0 < size <= _HEADER_LIMIT else b""
    try:
        return [str(k) for k in json.loads(raw) if k != "__metadata__"]
    except (ValueError, TypeError) as err:
        raise ModelError(f"{file_uri} is not a safetensors file ({type(err).__name__})") from None


def _index_files(raw: bytes, index_uri: str) -> list[str]:
    """The weight files a safetensors index names, each a relative path inside its folder. Raises ModelError for an
    index that is not JSON with a weight_map, or that names a file outside the folder."""
    try:
        weight_map = json.loads(raw)["weight_map"]
        files = sorted({str(f) for f in weight_map.values()})
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ModelError(f"{index_uri} is not a tensor index ({type(err).__name__}: {err}): expected JSON with a "
                         "weight_map of tensor -> file") from None
    for f in files:
        if not f or f.startswith("/") or "\\" in f or "://" in f or any(p in ("", ".", "..") for p in f.split("/")):
            raise ModelError(f"{index_uri} names the file {f[:200]!r}, which is not a relative path inside its folder: "
                             "an index may only name the folder's own files")
    return files


def _check_layout(entries: dict[str, TensorEntry], data_start: int, length: int, where: str) -> None:
    """Raise ModelError unless the tensors tile the file's data exactly: back to back from ``data_start``, each as
    long as its dtype and shape say, the last ending at the file's ``length`` (so a cut-off file is caught here)."""
    position = data_start
    for key, e in sorted(entries.items(), key=lambda item: (item[1].start, item[1].end)):
        count = 1
        for d in e.shape:
            count *= d
        want = count * _ITEM_BYTES.get(e.dtype, 0) if min(e.shape, default=1) >= 0 else -1
        if e.start != position or (e.dtype in _ITEM_BYTES and e.nbytes != want) or e.end < e.start:
            raise ModelError(f"{where}: tensor {key[:120]} has byte range [{e.start}, {e.end}), which does not follow "
                             "the tensor before it with its dtype and shape: the header is corrupt")
        position = e.end
    if position != length:
        raise ModelError(f"{where} is {'truncated' if position > length else 'padded'}: its header describes "
                         f"{position} bytes, the file has {length}; copy it again")


def _spans(entries: list[tuple[str, TensorEntry]]) -> list[tuple[str, int, int, list[tuple[str, TensorEntry]]]]:
    """The tensors as (file, start, end, members) byte spans: adjacent tensors of one file merged, so a layer's
    tensors, stored back to back, come in one ranged read (nothing between them is fetched)."""
    spans: list[tuple[str, int, int, list[tuple[str, TensorEntry]]]] = []
    for key, e in sorted(entries, key=lambda item: (item[1].file, item[1].start)):
        if spans and spans[-1][0] == e.file and spans[-1][2] == e.start:
            file, start, _, members = spans[-1]
            spans[-1] = (file, start, e.end, [*members, (key, e)])
        else:
            spans.append((e.file, e.start, e.end, [(key, e)]))
    return spans


def stored_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (e.g. "BF16"); ModelError for one nesta_ray does not read."""
    if name not in _DTYPES:
        raise ModelError(f"safetensors dtype {name} is not one nesta_ray reads ({', '.join(_DTYPES)})")
    return _DTYPES[name]


def _tensor(data: bytearray, e: TensorEntry, key: str) -> torch.Tensor:
    dtype = stored_dtype(e.dtype)
    if len(data) != e.nbytes:
        raise ModelError(f"tensor {key}: read {len(data)} bytes, its header says {e.nbytes}")
    flat = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
    return flat.reshape(e.shape)
