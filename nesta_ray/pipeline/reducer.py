"""The reducer: assemble a compressed checkpoint from the source model's safetensors and the staged layers.

One decoder layer is in memory at a time (plus the shard being filled): the source's tensors of that layer minus
the weights of its planned linears, plus their staged factors. No process needs the whole model.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from nesta_ray.errors import CheckpointError
from nesta_ray.models import ArchSpec
from nesta_ray.pipeline.plan import Plan
from nesta_ray.pipeline.staging import LayerStage
from nesta_ray.sources import read_tensors, weight_files
from nesta_ray.storage import RunWriter


def tied_aliases(skeleton: nn.Module) -> dict[str, str]:
    """alias -> kept name for parameters that are one tensor under two names (e.g. a tied lm_head)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in skeleton.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def _tensors(folder: str, plan: Plan, stage: LayerStage, spec: ArchSpec, num_layers: int,
             stats: dict[str, dict]) -> Iterator[dict[str, torch.Tensor]]:
    """The checkpoint's tensors, in groups: everything outside the decoder layers, then layer by layer."""
    files = weight_files(folder)
    yield read_tensors(folder, "", files, exclude=f"{spec.layers}.")
    done = stage.done()
    for i in range(num_layers):
        prefix = f"{spec.layers}.{i}."
        tensors = {prefix + k: t for k, t in read_tensors(folder, prefix, files).items()}
        if plan.for_layer(i):
            for name, r in stage.get(i).items() if i in done else ():
                del tensors[f"{name}.weight"]
                tensors[f"{name}.A"] = torch.from_numpy(r["A"].copy())
                tensors[f"{name}.B"] = torch.from_numpy(r["B"].copy())
                stats[name] = {k: v for k, v in r.items() if k not in ("A", "B")}
        yield tensors


def write_from_stage(writer: RunWriter, folder: str, plan: Plan, stage: LayerStage, spec: ArchSpec,
                     num_layers: int, shard_bytes: int) -> dict[str, dict]:
    """Put every tensor of the compressed model into ``writer`` as safetensors shards of at most ``shard_bytes``
    (a larger group gets its own). Returns the staged statistics per compressed linear. Raises CheckpointError
    when a planned layer is not staged."""
    missing = sorted(set(plan.layers()) - stage.done())
    if missing:
        raise CheckpointError(f"layers {missing[:5]} are not staged under {stage.uri}: the job did not finish them")
    stats: dict[str, dict] = {}
    buffer: dict[str, torch.Tensor] = {}
    count = 0

    def flush() -> None:
        nonlocal buffer, count
        if buffer:
            count += 1
            writer.put_tensors(f"model-{count:05d}.safetensors", buffer, metadata={"format": "pt"})
            buffer = {}

    for group in _tensors(folder, plan, stage, spec, num_layers, stats):
        size = sum(t.numel() * t.element_size() for t in buffer.values())
        if buffer and size + sum(t.numel() * t.element_size() for t in group.values()) > shard_bytes:
            flush()
        buffer.update(group)
    flush()
    return stats
