"""The safetensors tensors of a model folder, local or on any fsspec storage, read tensor by tensor.

A ``WeightStore`` reads the index (or the single ``model.safetensors``) and each file's header once: 8 bytes of
length, then the JSON header, which names every tensor with its dtype, shape and byte offsets. Tensors are then
read one by one: memory-mapped for a local folder, by ranged reads (``cat_file(path, start, end)``) on remote
storage, so a layer shard fetches the bytes of its own tensors and never copies the whole model. ``bytes_read``
counts what was fetched (headers included).
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
                files = sorted(set(json.loads(raw)["weight_map"].values()))
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
        with guard(join(self.uri, file), self.storage_options, write=False):
            size = int.from_bytes(self.fs.cat_file(path, start=0, end=8), "little")
            if not 0 < size <= _HEADER_LIMIT:
                raise ModelError(f"{join(self.uri, file)} is not a safetensors file (header length {size})")
            raw = self.fs.cat_file(path, start=8, end=8 + size)
        self.bytes_read += 8 + len(raw)
        self.headers[file] = raw
        try:
            header = json.loads(raw)
            return {k: TensorEntry(file, v["dtype"], tuple(v["shape"]), 8 + size + v["data_offsets"][0],
                                   8 + size + v["data_offsets"][1])
                    for k, v in header.items() if k != "__metadata__"}
        except (ValueError, KeyError, TypeError, IndexError) as err:
            raise ModelError(f"{join(self.uri, file)} has a malformed safetensors header ({err})") from None

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
