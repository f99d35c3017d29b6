"""The ``nesta_ray.lowrank`` v1 format: every file and tensor name of a run and of a stage, in one place.

An output URI is a root R::

    R/latest                                      run id of the last published run (written last)
    R/runs/<id>/model-0000i-of-0000n.safetensors  <linear>.A (out, k) and <linear>.B (k, in) for compressed
                                                  linears; every other tensor as in the source (tied ones once)
    R/runs/<id>/model.safetensors.index.json      tensor -> shard map
    R/runs/<id>/config.json, tokenizer files      the source model's
    R/runs/<id>/nesta.json                        the run's metadata (``meta.RunMeta``)
    R/runs/<id>/report.json, report.md, report.html
    R/runs/<id>/dense/...                         with export_dense: a plain Hugging Face folder (A·B multiplied out)
    R/runs/<id>/manifest.json                     sha256 and size of every file above (written after them)
    R/runs/<id>/_SUCCESS                          written after the manifest; a run without it is never read
    R/staging/<fingerprint>/layer-NNNNN.safetensors  one finished layer's factors, before the run is committed
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from nesta_ray.io.weights import INDEX as INDEX  # the Hugging Face names a run's weights follow too
from nesta_ray.io.weights import SINGLE as SINGLE
from nesta_ray.method.decompose import Factors

FORMAT = "nesta_ray.lowrank"
FORMAT_VERSION = 1
NESTA_JSON, MANIFEST, SUCCESS, LATEST = "nesta.json", "manifest.json", "_SUCCESS", "latest"
REPORT_JSON, REPORT_MD, REPORT_HTML = "report.json", "report.md", "report.html"
RUNS, STAGING, DENSE = "runs", "staging", "dense"
STAGE_DTYPE = torch.float32  # staged factors keep the decomposition's float32; a run stores the weight's dtype
_STAGED = ("layer-", ".safetensors")


def shard_name(index: int, count: int) -> str:
    """Name of weight shard ``index`` (1-based) of ``count``: ``model-00001-of-00003.safetensors``."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def weight_key(name: str) -> str:
    """The dense weight's tensor name of linear ``name``."""
    return f"{name}.weight"


def factor_keys(name: str) -> tuple[str, str]:
    """Tensor names of linear ``name``'s factors A (out, k) and B (k, in)."""
    return f"{name}.A", f"{name}.B"


def factor_tensors(name: str, f: Factors, dtype: torch.dtype = STAGE_DTYPE) -> dict[str, torch.Tensor]:
    """Linear ``name``'s factors as stored, in ``dtype``: {``<name>.A``: (out, k), ``<name>.B``: (k, in)},
    contiguous."""
    a, b = factor_keys(name)
    return {a: f.A.to(dtype).contiguous(), b: f.B.to(dtype).contiguous()}


def factors_from(tensors: Mapping[str, torch.Tensor], name: str, stats: Mapping[str, Any]) -> Factors:
    """Linear ``name``'s Factors from stored tensors and its statistics (``Factors.stats``)."""
    a, b = factor_keys(name)
    return Factors.from_stats(tensors[a], tensors[b], stats)


def is_factor_key(key: str) -> bool:
    """True for a tensor name that holds a factor (``*.A`` / ``*.B``)."""
    return key.endswith((".A", ".B"))


def stage_object(layer: int) -> str:
    """Name of layer ``layer``'s object in a stage."""
    return f"{_STAGED[0]}{layer:05d}{_STAGED[1]}"


def staged_layer(name: str) -> int | None:
    """The layer index a stage object's name holds, or None for any other name."""
    head, tail = _STAGED
    if name.startswith(head) and name.endswith(tail) and name[len(head):-len(tail)].isdigit():
        return int(name[len(head):-len(tail)])
    return None


