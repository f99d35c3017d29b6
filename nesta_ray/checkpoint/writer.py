"""Writing a run's files: the weight shards assembled from the source's safetensors and the stage (the reducer),
the Hugging Face files (the low-rank config.json, the modeling files, the source's tokenizer), ``nesta.json`` and
the dense export.

One decoder layer is in memory at a time (plus the shard being filled): the source's tensors of that layer minus
the weights of its planned linears, plus their staged factors. Shard sizes are known before anything is read
(from the source's safetensors headers and the planned ranks), so shards carry their final
``model-0000i-of-0000n`` names. No process needs the whole model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from nesta_ray import model as model_package
from nesta_ray.checkpoint.layout import (
    CODE_FILES,
    CONFIG,
    DENSE,
    HF_INDEX,
    NESTA_JSON,
    SINGLE,
    factor_tensors,
    lowrank_config,
    shard_name,
    weight_key,
)
from nesta_ray.checkpoint.meta import LinearRecord, RunMeta
from nesta_ray.checkpoint.runs import RunWriter
from nesta_ray.checkpoint.stage import LayerStage
from nesta_ray.errors import CheckpointError
from nesta_ray.io.sources import ModelSource, model_files
from nesta_ray.io.weights import WeightStore, stored_dtype
from nesta_ray.model.arch import ArchSpec
from nesta_ray.plan.linears import Plan


@dataclass(frozen=True)
class _Group:
    """One group of the checkpoint's tensors: the source's tensors ``keys`` of decoder layer ``layer`` (None:
    everything outside the decoder layers) except the planned linears' dense weights, the bytes the group takes
    compressed (``size``: the staged factors in place of those weights) and dense (``dense_size``)."""

    keys: list[str]
    layer: int | None
    size: int
    dense_size: int


def _groups(store: WeightStore, plan: Plan, spec: ArchSpec, num_layers: int) -> list[_Group]:
    """Everything outside the decoder layers, then each decoder layer, with their stored sizes (from the
    source's headers and the planned ranks; nothing else is read)."""
    inside, planned = f"{spec.layers}.", {weight_key(p.name) for p in plan.modules}
    outside = [k for k in store.keys() if not k.startswith(inside)]
    size = sum(store.entries[k].nbytes for k in outside)
    groups = [_Group(outside, None, size, size)]
    for i in range(num_layers):
        keys = [k for k in store.keys() if k.startswith(spec.layer_prefix(i))]
        kept = [k for k in keys if k not in planned]
        factors = sum(p.rank * (p.m + p.n) * _itemsize(store, p.name) for p in plan.modules if p.layer == i)
        groups.append(_Group(kept, i, sum(store.entries[k].nbytes for k in kept) + factors,
                             sum(store.entries[k].nbytes for k in keys)))
    return groups


def _itemsize(store: WeightStore, name: str) -> int:
    """Bytes per element of linear ``name``'s stored weight (its factors are stored in that dtype)."""
    return torch.empty(0, dtype=stored_dtype(store.entries[weight_key(name)].dtype)).element_size()


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


def _stream(groups: list[_Group], sizes: list[int], limit: int,
            assemble: Callable[[_Group], dict[str, torch.Tensor]],
            put: Callable[[int, int, dict[str, torch.Tensor]], None]) -> None:
    """Assemble the groups in order into shards of at most ``limit`` bytes (by ``sizes``), calling
    ``put(index, count, tensors)`` (1-based index) once per shard; one group in memory at a time besides the
    shard being filled."""
    shard_of = assign_shards(sizes, limit)
    count, buffer = shard_of[-1] + 1, {}
    for index, (group, shard) in enumerate(zip(groups, shard_of)):
        buffer.update(assemble(group))
        if index + 1 == len(groups) or shard_of[index + 1] != shard:
            put(shard + 1, count, buffer)
            buffer = {}


def _check_staged(plan: Plan, stage: LayerStage) -> None:
    missing = sorted(set(plan.layers()) - stage.done())
    if missing:
        raise CheckpointError(f"layers {missing[:5]} are not staged under {stage.uri}: the job did not finish them")


def write_weights(writer: RunWriter, source: ModelSource, plan: Plan, stage: LayerStage, spec: ArchSpec,
                  num_layers: int, shard_bytes: int) -> dict[str, LinearRecord]:
    """Put every tensor of the compressed model (``num_layers`` decoder layers) into ``writer`` as safetensors
    shards of at most ``shard_bytes`` (a larger group gets its own): the source's tensors (read tensor by tensor
    where they are; the planned linears' dense weights are never read) and the staged factors, in the dtype of
    the weight each replaces. Returns the record of every compressed linear. Raises CheckpointError when a planned
    layer is not staged."""
    _check_staged(plan, stage)
    store = source.weights()
    groups = _groups(store, plan, spec, num_layers)
    shapes = {p.name: (p.m, p.n) for p in plan.modules}
    records: dict[str, LinearRecord] = {}

    def assemble(group: _Group) -> dict[str, torch.Tensor]:
        tensors = store.read(group.keys)
        if group.layer is not None and plan.names(group.layer):
            for name, f in stage.get(group.layer).items():
                tensors.update(factor_tensors(name, f, stored_dtype(store.entries[weight_key(name)].dtype)))
                records[name] = LinearRecord.of(f, shapes[name])
        return tensors

    _stream(groups, [g.size for g in groups], shard_bytes, assemble,
            lambda index, count, tensors: writer.put_tensors(shard_name(index, count), tensors,
                                                             metadata={"format": "pt"}))
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


def write_dense(writer: RunWriter, source: ModelSource, plan: Plan, stage: LayerStage, spec: ArchSpec,
                num_layers: int, shard_bytes: int) -> None:
    """Write the compressed model multiplied out (A·B in each weight's stored dtype) with the source's config and
    tokenizer as a plain Hugging Face folder under ``dense/``, streamed like ``write_weights`` (no process holds
    the whole model). Raises CheckpointError when a planned layer is not staged."""
    _check_staged(plan, stage)
    store = source.weights()
    groups = _groups(store, plan, spec, num_layers)
    weight_map: dict[str, str] = {}

    def assemble(group: _Group) -> dict[str, torch.Tensor]:
        tensors = store.read(group.keys)
        if group.layer is not None and plan.names(group.layer):
            for name, f in stage.get(group.layer).items():
                key = weight_key(name)
                tensors[key] = (f.A @ f.B).to(stored_dtype(store.entries[key].dtype))
        return tensors

    def put(index: int, count: int, tensors: dict[str, torch.Tensor]) -> None:
        name = SINGLE if count == 1 else shard_name(index, count)
        writer.put_bytes(f"{DENSE}/{name}", st_save(tensors, metadata={"format": "pt"}))
        weight_map.update(dict.fromkeys(tensors, name))

    _stream(groups, [g.dense_size for g in groups], shard_bytes, assemble, put)
    if len(set(weight_map.values())) > 1:
        total = sum(store.entries[k].nbytes for k in store.keys())
        writer.put_json(f"{DENSE}/{HF_INDEX}", {"metadata": {"total_size": total}, "weight_map": weight_map})
    for path in model_files(source.folder):
        writer.put_file(f"{DENSE}/{os.path.basename(path)}", path)
