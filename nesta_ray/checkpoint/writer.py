"""Writing a run's files: the weight shards assembled from the source's safetensors and the stage (the reducer),
the Hugging Face files (the low-rank config.json, the modeling files, the source's tokenizer), ``nesta.json`` and
the dense export.

One decoder layer is in memory at a time (plus the shard being filled): the source's tensors of that layer minus
the weights of its planned linears, plus their staged factors. Shard sizes are known before anything is read
(from the source's safetensors headers and the planned ranks), so shards carry their final
``model-0000i-of-0000n`` names. No process needs the whole model.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nesta_ray import model as model_package
from nesta_ray.checkpoint.layout import (
    CODE_FILES,
    CONFIG,
    DENSE,
    FACTOR_DTYPE,
    NESTA_JSON,
    factor_tensors,
    lowrank_config,
    shard_name,
    weight_key,
)
from nesta_ray.checkpoint.meta import LinearRecord, RunMeta
from nesta_ray.checkpoint.runs import RunWriter
from nesta_ray.checkpoint.stage import LayerStage
from nesta_ray.errors import CheckpointError
from nesta_ray.io.sources import model_files, read_tensors, weight_files
from nesta_ray.method.decompose import Factors
from nesta_ray.model.arch import ArchSpec
from nesta_ray.model.lowrank_linear import multiply_out
from nesta_ray.plan.linears import Plan


def _stored_bytes(files: dict[str, str]) -> dict[str, int]:
    """Bytes of every tensor of a model's safetensors files, from their headers (nothing else is read)."""
    sizes: dict[str, int] = {}
    for path in sorted(set(files.values())):
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for key, info in header.items():
            if key != "__metadata__" and files.get(key) == path:
                start, end = info["data_offsets"]
                sizes[key] = end - start
    return sizes


@dataclass(frozen=True)
class _Group:
    """One group of the checkpoint's tensors: the source's tensors under ``prefix`` (minus those under
    ``exclude``), with decoder layer ``layer``'s planned weights replaced by their staged factors."""

    prefix: str
    exclude: str | None
    layer: int | None
    size: int  # stored bytes


def _groups(files: dict[str, str], plan: Plan, spec: ArchSpec, num_layers: int) -> list[_Group]:
    """Everything outside the decoder layers, then each decoder layer, with their stored sizes."""
    sizes = _stored_bytes(files)
    factor_bytes = torch.finfo(FACTOR_DTYPE).bits // 8
    inside = f"{spec.layers}."
    groups = [_Group("", inside, None, sum(v for k, v in sizes.items() if not k.startswith(inside)))]
    for i in range(num_layers):
        prefix = spec.layer_prefix(i)
        size = sum(v for k, v in sizes.items() if k.startswith(prefix))
        for p in plan.modules:
            if p.layer == i:
                size += p.rank * (p.m + p.n) * factor_bytes - sizes[weight_key(p.name)]
        groups.append(_Group(prefix, None, i, size))
    return groups


def assign_shards(sizes: list[int], limit: int) -> list[int]:
    """Shard index (0-based) of each group of ``sizes`` bytes, in order: a shard takes groups while they fit in
    ``limit`` bytes; a group larger than the limit gets a shard of its own."""
    out, shard, filled = [], 0, 0
    for size in sizes:
        if filled and filled + size > limit:
            shard, filled = shard + 1, 0
        out.append(shard)
        filled += size
    return out


def _tensors(folder: str, files: dict[str, str], group: _Group, plan: Plan,
             stage: LayerStage) -> tuple[dict[str, torch.Tensor], dict[str, Factors]]:
    """A group's tensors as the checkpoint stores them, and the staged factors they include."""
    read = read_tensors(folder, group.prefix, files, exclude=group.exclude)
    tensors = {group.prefix + k: t for k, t in read.items()}
    factors = stage.get(group.layer) if group.layer is not None and plan.names(group.layer) else {}
    for name, f in factors.items():
        del tensors[weight_key(name)]
        tensors.update(factor_tensors(name, f))
    return tensors, factors


def write_weights(writer: RunWriter, folder: str, plan: Plan, stage: LayerStage, spec: ArchSpec,
                  num_layers: int, shard_bytes: int) -> dict[str, LinearRecord]:
    """Put every tensor of the compressed model (``num_layers`` decoder layers) into ``writer`` as safetensors
    shards of at most ``shard_bytes`` (a larger group gets its own). Returns the record of every compressed
    linear. Raises CheckpointError when a planned layer is not staged."""
    missing = sorted(set(plan.layers()) - stage.done())
    if missing:
        raise CheckpointError(f"layers {missing[:5]} are not staged under {stage.uri}: the job did not finish them")
    files = weight_files(folder)
    groups = _groups(files, plan, spec, num_layers)
    shard_of = assign_shards([g.size for g in groups], shard_bytes)
    count = shard_of[-1] + 1
    shapes = {p.name: (p.m, p.n) for p in plan.modules}
    records: dict[str, LinearRecord] = {}
    buffer: dict[str, torch.Tensor] = {}
    for index, (group, shard) in enumerate(zip(groups, shard_of)):
        tensors, factors = _tensors(folder, files, group, plan, stage)
        buffer.update(tensors)
        records.update({name: LinearRecord.of(f, shapes[name]) for name, f in factors.items()})
        if index + 1 == len(groups) or shard_of[index + 1] != shard:
            writer.put_tensors(shard_name(shard + 1, count), buffer, metadata={"format": "pt"})
            buffer = {}
    return records


def write_model_files(writer: RunWriter, folder: str, ranks: Mapping[str, int], dtype: str) -> None:
    """The run's Hugging Face files: config.json (``layout.lowrank_config`` around the source's config.json, with
    the ``ranks`` of the compressed linears and the model's ``dtype``), the modeling files (verbatim copies from
    nesta_ray/model/) and the source's other non-weight files (tokenizer, generation config). Raises
    CheckpointError for a source config.json that cannot be read."""
    source: dict[str, Any] | None = None
    for path in model_files(folder):
        if os.path.basename(path) == CONFIG:
            try:
                source = json.loads(Path(path).read_text())
            except (OSError, ValueError) as err:
                raise CheckpointError(f"cannot read the source's {path} ({err})") from None
        else:
            writer.put_file(os.path.basename(path), path)
    if not isinstance(source, dict):
        raise CheckpointError(f"{folder} holds no {CONFIG} object: not a Hugging Face model folder")
    writer.put_json(CONFIG, lowrank_config(source, ranks, dtype))
    code = Path(next(iter(model_package.__path__)))
    for name in CODE_FILES:
        writer.put_file(name, str(code / name))


def write_meta(writer: RunWriter, meta: RunMeta) -> None:
    """Write ``nesta.json``."""
    writer.put_json(NESTA_JSON, meta.to_json())


def write_dense(writer: RunWriter, model: nn.Module, tokenizer: Any) -> None:
    """Write ``model`` with its LowRankLinears multiplied out (a copy; ``model`` is unchanged) and the tokenizer as a
    plain Hugging Face folder under ``dense/``."""
    with tempfile.TemporaryDirectory() as tmp:
        dense: Any = multiply_out(copy.deepcopy(model))
        dense.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name in sorted(os.listdir(tmp)):
            writer.put_file(f"{DENSE}/{name}", os.path.join(tmp, name))
