"""The ``nesta_ray.lowrank`` v2 format: every file and tensor name of a run and of a stage, in one place.

An output URI is a root R::

    R/latest                                      run id of the last published run (written last)
    R/runs/<id>/model-0000i-of-0000n.safetensors  <linear>.A (out, k) and <linear>.B (k, in) for compressed
                                                  linears; every other tensor as in the source (tied ones once)
    R/runs/<id>/model.safetensors.index.nesta_lowrank.json   tensor -> shard map (the weights' variant name:
                                                  a loader that does not know the format finds no weights)
    R/runs/<id>/config.json                       a NestaLowRankConfig: the source's config under text_config,
                                                  every compressed linear's rank under lowrank_ranks
    R/runs/<id>/modeling_nesta_lowrank.py, lowrank_linear.py   the classes that load it (trust_remote_code=True),
                                                  verbatim copies of nesta_ray/model/<same name>
    R/runs/<id>/tokenizer files, generation_config.json   the source model's
    R/runs/<id>/nesta.json                        the run's metadata (``meta.RunMeta``)
    R/runs/<id>/report.json, report.md, report.html
    R/runs/<id>/dense/...                         with export_dense: a plain Hugging Face folder (A·B multiplied out)
    R/runs/<id>/manifest.json                     sha256 and size of every file above (written after them)
    R/runs/<id>/_SUCCESS                          written after the manifest; a run without it is never read
    R/staging/<fingerprint>/layer-NNNNN.safetensors  one finished layer's factors, before the run is committed

v1 runs (still read) differ in three points: config.json is the source's own, the index is
``model.safetensors.index.json`` and there are no modeling files.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from nesta_ray.io.weights import INDEX as _HF_INDEX
from nesta_ray.io.weights import SINGLE as SINGLE
from nesta_ray.method.decompose import Factors

HF_INDEX = _HF_INDEX  # the tensor index of a source, of a v1 run and of the dense export

FORMAT = "nesta_ray.lowrank"
FORMAT_VERSION = 2  # the version written
READABLE_VERSIONS = (1, 2)
NESTA_JSON, MANIFEST, SUCCESS, LATEST = "nesta.json", "manifest.json", "_SUCCESS", "latest"
CONFIG = "config.json"
WEIGHTS_VARIANT = "nesta_lowrank"  # = modeling_nesta_lowrank.WEIGHTS_VARIANT
INDEX = f"model.safetensors.index.{WEIGHTS_VARIANT}.json"
MODEL_TYPE = "nesta_lowrank"  # = modeling_nesta_lowrank.MODEL_TYPE
MODELING_FILE, LOWRANK_FILE = "modeling_nesta_lowrank.py", "lowrank_linear.py"
CODE_FILES = (MODELING_FILE, LOWRANK_FILE)  # copied verbatim from nesta_ray/model/
AUTO_MAP = {"AutoConfig": "modeling_nesta_lowrank.NestaLowRankConfig",
            "AutoModelForCausalLM": "modeling_nesta_lowrank.NestaLowRankForCausalLM"}
ARCHITECTURE = "NestaLowRankForCausalLM"
REPORT_JSON, REPORT_MD, REPORT_HTML = "report.json", "report.md", "report.html"
RUNS, STAGING, DENSE = "runs", "staging", "dense"
STAGE_DTYPE = torch.float32  # staged factors keep the decomposition's float32; a run stores the weight's dtype
_STAGED = ("layer-", ".safetensors")


def lowrank_config(source: Mapping[str, Any], ranks: Mapping[str, int], dtype: str) -> dict[str, Any]:
    """A run's config.json: a NestaLowRankConfig around the source model's config.json object ``source`` (kept
    verbatim as ``text_config``), with the rank of every compressed linear and the model's ``dtype``."""
    return {"architectures": [ARCHITECTURE], "auto_map": dict(AUTO_MAP), "model_type": MODEL_TYPE,
            "dtype": dtype, "lowrank_ranks": dict(sorted(ranks.items())), "text_config": dict(source)}


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


STAGE_ALLOCATION = "allocation.json"  # a stage's rank allocation (method.allocation: sensitivity)


def stage_object(layer: int) -> str:
    """Name of layer ``layer``'s object in a stage."""
    return f"{_STAGED[0]}{layer:05d}{_STAGED[1]}"


def staged_layer(name: str) -> int | None:
    """The layer index a stage object's name holds, or None for any other name."""
    head, tail = _STAGED
    if name.startswith(head) and name.endswith(tail) and name[len(head):-len(tail)].isdigit():
        return int(name[len(head):-len(tail)])
    return None


