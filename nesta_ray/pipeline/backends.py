"""Forward backends of a layer shard: where the shard's decoder layers live and how a layer reaches the device.

- ``layerwise`` (default): the shard's layers are read from the source's safetensors (only their tensors) into
  host memory. On a GPU a layer is moved to the device for a call and back after it (``loaded``), unless the whole
  shard fits in half the device's free memory, in which case the layers stay on the device. On a CPU the host is
  the device.
- ``deepspeed``: DeepSpeed ZeRO-Inference. Each layer is partitioned by ZeRO stage 3 right after it is read, its
  parameters offloaded to host memory (pinned where CUDA exists) or NVMe; a layer's forward gathers its weights
  onto the device and frees them after. Each shard actor is its own distributed world of size 1 (gloo on CPU,
  NCCL on GPU).

Both embed on the host (first shard only: token embedding and rotary tables), hold the final norm and the head on
the last shard only (for evaluation and generation), read every tensor through the source's ``WeightStore``
(ranged reads of its own tensors on remote storage), and give a shard the same verbs: ``embed``, ``loaded``,
``run``, ``logits``, ``inputs_of``, ``weights``, ``install``, ``restore``.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from nesta_ray.errors import ModelError
from nesta_ray.io.sources import ModelSource, skeleton
from nesta_ray.model.arch import ArchSpec, arch_for
from nesta_ray.model.layers import (
    capture_layer_inputs,
    decoder_layers,
    group_inputs,
    head_logits,
    materialise,
    run_layer,
    weight_of,
)
from nesta_ray.pipeline.layer_host import LayerHost
from nesta_ray.plan.linears import ModulePlan

RESIDENT_FRACTION = 0.5  # layerwise on a GPU: keep the shard on the device when it needs at most this much free memory


@dataclass(frozen=True)
class BackendSpec:
    """Which backend a shard uses: ``name`` layerwise | deepspeed; ``offload`` cpu | nvme and ``nvme_path`` for
    deepspeed (validated by ``RuntimeConfig``)."""

    name: str = "layerwise"
    offload: str = "cpu"
    nvme_path: str | None = None


def compute_device() -> torch.device:
    """cuda where this process sees a GPU (a Ray actor sees only the GPU it was given), else cpu."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor inside (tuples, lists, dicts) moved to ``device``; other values unchanged."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@dataclass(frozen=True)
class ShardPart:
    """Which part of the model a shard holds: its decoder layers, whether it embeds (first) and whether it holds
    the final norm and the head (last)."""

    layers: list[int]
    first: bool
    last: bool


def open_backend(spec: BackendSpec, source: ModelSource, part: ShardPart, *, dtype: str,
                 device: torch.device | None = None) -> Backend:
    """The backend ``spec`` names for ``part`` of the model at ``source`` (ValueError if unknown)."""
    device = device or compute_device()
    if spec.name == "layerwise":
        return LayerwiseBackend(source, part, dtype=dtype, device=device)
    if spec.name == "deepspeed":
        return DeepSpeedBackend(source, part, dtype=dtype, device=device, offload=spec.offload,
                                nvme_path=spec.nvme_path)
    raise ValueError(f"unknown backend {spec.name!r}; use layerwise or deepspeed")


class _Backend(LayerHost):
    """The shared part: a meta-device skeleton of the model, the first shard's embedding on the host, the last
    shard's norm and head on the device, and each of the shard's decoder layers read alone from the source
    (``_read_layer``). Installed factors replace dense linears, which are kept (``restore`` puts them back)."""

    def __init__(self, source: ModelSource, part: ShardPart, *, dtype: str, device: torch.device) -> None:
        from transformers import AutoConfig

        super().__init__()
        self.source, self.device, self.layer_ids = source, device, part.layers
        self.factor_device = device  # where installed factors live (the layer's home between calls)
        config = AutoConfig.from_pretrained(source.folder)
        self.spec: ArchSpec = arch_for(config.model_type)
        self.skeleton = skeleton(config, getattr(torch, dtype))  # parameters on meta, computed buffers real
        self.store = source.weights()
        for name in self.spec.stem if part.first else ():  # the embedding, named by the architecture map
            path = f"{self.spec.backbone}.{name}"
            materialise(self.skeleton.get_submodule(path), self.store.read_prefix(f"{path}."))
        if part.last:
            self._read_head()

    def _read_head(self) -> None:
        """The final norm and the head, on the device; a tied head reads the tensor it is tied to."""
        norm = f"{self.spec.backbone}.{self.spec.norm}"
        materialise(self.skeleton.get_submodule(norm), self.store.read_prefix(f"{norm}."))
        head = self.skeleton.get_submodule(self.spec.head)
        tied_to = f"{self.spec.backbone}.{self.spec.stem[0]}."  # a tied head shares the embedding's tensors
        stored = {local: full if full in self.store.entries else tied_to + local
                  for local in head.state_dict() for full in [f"{self.spec.head}.{local}"]}
        missing = sorted(k for k in stored.values() if k not in self.store.entries)
        if missing:
            raise ModelError(f"{self.source.weights_uri} stores no {missing[0]}: the head is neither stored nor tied "
                             "to the embedding")
        read = self.store.read(sorted(set(stored.values())))
        materialise(head, {local: read[key] for local, key in stored.items()})
        for path in (norm, self.spec.head):
            self.skeleton.get_submodule(path).to(self.device)

    def _read_layer(self, i: int) -> nn.Module:
        """Decoder layer ``i`` alone, on the host, with its weights from the source."""
        layer = copy.deepcopy(decoder_layers(self.skeleton, self.spec)[i])
        layer.to_empty(device="cpu")
        layer.load_state_dict(self.store.read_prefix(self.spec.layer_prefix(i)), strict=True)
        return layer

    def embed(self, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """Token ids (b, t) -> hidden states (b, t, d) entering layer 0 and the layer kwargs, on the host."""
        with torch.no_grad():
            return capture_layer_inputs(self.skeleton, self.spec, ids)

    def inputs_of(self, i: int) -> dict[str, nn.Module]:
        """Layer ``i``'s modules whose inputs feed each input group (for Gram hooks)."""
        return group_inputs(self.layer(i), self.spec)

    def layer(self, i: int) -> nn.Module:
        raise NotImplementedError

    @contextmanager
    def loaded(self, i: int) -> Iterator[None]:
        """Layer ``i`` is runnable inside this block."""
        yield

    def run(self, i: int, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """Layer ``i``'s output (b, t, d) for ``hidden`` (b, t, d); inputs on ``self.device``."""
        return run_layer(self.layer(i), hidden, kwargs)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (b, t, V) of the last layer's outputs (b, t, d) on ``self.device`` (last shard only)."""
        return head_logits(self.skeleton, self.spec, hidden)

    def close(self) -> None:
        """Free what the backend holds beyond the Python objects."""


class LayerwiseBackend(_Backend):
    """Layers in host memory, moved to the device per call (or kept there when the shard fits)."""

    def __init__(self, source: ModelSource, part: ShardPart, *, dtype: str, device: torch.device) -> None:
        super().__init__(source, part, dtype=dtype, device=device)
        self.layers = {i: self._read_layer(i) for i in part.layers}
        self.resident = device.type == "cpu"
        if device.type == "cuda":
            need = sum(p.numel() * p.element_size() for m in self.layers.values() for p in m.parameters())
            self.resident = need <= RESIDENT_FRACTION * torch.cuda.mem_get_info(device)[0]
            if self.resident:
                for m in self.layers.values():
                    m.to(device)
        self.factor_device = device if self.resident else torch.device("cpu")

    def layer(self, i: int) -> nn.Module:
        return self.layers[i]

    @contextmanager
    def loaded(self, i: int) -> Iterator[None]:
        if self.resident:
            yield
            return
        self.layers[i].to(self.device)
        try:
            yield
        finally:
            self.layers[i].to("cpu")


class _Layers(nn.Module):
    """The container ZeRO-3 wraps: the shard's layers by index; ``forward`` runs one of them."""

    def __init__(self, layers: dict[int, nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({str(i): m for i, m in layers.items()})

    def forward(self, key: str, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        return run_layer(self.layers[key], hidden, kwargs)


class DeepSpeedBackend(_Backend):
    """ZeRO-Inference: ZeRO stage 3 in a world of size 1, parameters offloaded to ``offload`` (cpu | nvme)."""

    def __init__(self, source: ModelSource, part: ShardPart, *, dtype: str, device: torch.device,
                 offload: str = "cpu", nvme_path: str | None = None) -> None:
        super().__init__(source, part, dtype=dtype, device=device)
        deepspeed = init_world(device)
        largest = max(p.numel() for i in part.layers
                      for p in decoder_layers(self.skeleton, self.spec)[i].parameters())
        self.config = ds_config(offload, nvme_path, pin=device.type == "cuda", largest_param=largest)
        built = {}
        for i in part.layers:  # partition each layer as it is read: at most one dense layer in host memory at a time
            built[i] = self._read_layer(i)
            deepspeed.zero.Init(module=built[i], config_dict_or_path=self.config, remote_device=offload,
                                pin_memory=device.type == "cuda", mem_efficient_linear=False)
        self.engine = deepspeed.initialize(model=_Layers(built), config=self.config)[0]
        self.engine.eval()

    def layer(self, i: int) -> nn.Module:
        return self.engine.module.layers[str(i)]

    def run(self, i: int, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        return self.engine(str(i), hidden, kwargs)

    def weights(self, i: int, plans: list[ModulePlan]) -> dict[str, np.ndarray]:
        """float32 weights (out, in), copied to the host while ZeRO has them gathered."""
        import deepspeed

        mods = {p.name: self._dense_linear(i, p.name) for p in plans}
        with deepspeed.zero.GatheredParameters([m.weight for m in mods.values()]):
            return {name: weight_of(m).detach().float().cpu().numpy().copy() for name, m in mods.items()}

    def close(self) -> None:
        self.engine.destroy()


def ds_config(offload: str, nvme_path: str | None, *, pin: bool, largest_param: int) -> dict:
    """A ZeRO-3 inference config: every parameter partitioned and offloaded (no persistence, no prefetch), NVMe
    swap buffers the size of the largest parameter (numel)."""
    param: dict[str, Any] = {"device": offload, "pin_memory": pin}
    if offload == "nvme":
        param.update(nvme_path=nvme_path, buffer_count=5, buffer_size=largest_param)
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "offload_param": param, "stage3_param_persistence_threshold": 0,
                              "stage3_prefetch_bucket_size": 0, "stage3_max_live_parameters": largest_param},
    }
    if offload == "nvme":
        cfg["aio"] = {"block_size": 1 << 20, "queue_depth": 8, "single_submit": False, "overlap_events": True}
    return cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_world(device: torch.device):
    """Import DeepSpeed and make this process a distributed world of size 1 (gloo on CPU, NCCL on GPU)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # no GPU here: say so instead of being warned
    import deepspeed
    import deepspeed.ops
    import torch.distributed as dist

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a ~60 s JIT build; size 1 needs no shm
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if not dist.is_initialized():
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
    return deepspeed


Backend = LayerwiseBackend | DeepSpeedBackend
