"""Forward backends of a layer shard: where the shard's decoder layers live and how a layer reaches the device.

- ``layerwise`` (default): the shard's layers are read from the source's safetensors (only their tensors) into
  host memory. On a GPU a layer is moved to the device for a call and back after it (``loaded``), unless the whole
  shard fits in half the device's free memory, in which case the layers stay on the device. On a CPU the host is
  the device.
- ``deepspeed``: DeepSpeed ZeRO-Inference. Each layer is partitioned by ZeRO stage 3 right after it is read, its
  parameters offloaded to host memory (pinned where CUDA exists) or NVMe; a layer's forward gathers its weights
  onto the device and frees them after. Each shard actor is its own distributed world of size 1 (gloo on CPU,
  NCCL on GPU).

Both embed on the host (first shard only: token embedding and rotary tables, no head) and give a shard the same
verbs: ``embed``, ``loaded``, ``run``, ``inputs_of``, ``weights``, ``install``, ``release``.
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

from nesta_ray.io.sources import read_tensors, skeleton, weight_files
from nesta_ray.method.decompose import Factors
from nesta_ray.model.arch import ArchSpec, arch_for
from nesta_ray.model.layers import capture_layer_inputs, decoder_layers, group_inputs, materialise, run_layer, weight_of
from nesta_ray.model.lowrank import install_factors
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


def open_backend(spec: BackendSpec, folder: str, layers: list[int], *, first: bool, dtype: str,
                 device: torch.device | None = None) -> LayerwiseBackend | DeepSpeedBackend:
    """The backend ``spec`` names for decoder layers ``layers`` of the model in ``folder`` (ValueError if unknown)."""
    device = device or compute_device()
    if spec.name == "layerwise":
        return LayerwiseBackend(folder, layers, first=first, dtype=dtype, device=device)
    if spec.name == "deepspeed":
        return DeepSpeedBackend(folder, layers, first=first, dtype=dtype, device=device, offload=spec.offload,
                                nvme_path=spec.nvme_path)
    raise ValueError(f"unknown backend {spec.name!r}; use layerwise or deepspeed")


class _Backend:
    """The shared part: a meta-device skeleton of the model, the first shard's embedding on the host, and each of
    the shard's decoder layers read alone from safetensors (``_read_layer``)."""

    def __init__(self, folder: str, layers: list[int], *, first: bool, dtype: str, device: torch.device) -> None:
        from transformers import AutoConfig

        self.folder, self.device, self.layer_ids = folder, device, layers
        self.factor_device = device  # where installed factors live (the layer's home between calls)
        config = AutoConfig.from_pretrained(folder)
        self.spec: ArchSpec = arch_for(config.model_type)
        self.skeleton = skeleton(config, getattr(torch, dtype))  # parameters on meta, computed buffers real
        self.files = weight_files(folder)
        for name in self.spec.stem if first else ():  # the embedding, named by the architecture map
            path = f"{self.spec.backbone}.{name}"
            materialise(self.skeleton.get_submodule(path), read_tensors(folder, f"{path}.", self.files))

    def _read_layer(self, i: int) -> nn.Module:
        """Decoder layer ``i`` alone, on the host, with its weights from the source."""
        layer = copy.deepcopy(decoder_layers(self.skeleton, self.spec)[i])
        layer.to_empty(device="cpu")
        layer.load_state_dict(read_tensors(self.folder, self.spec.layer_prefix(i), self.files), strict=True)
        return layer

    def _local(self, i: int, name: str) -> str:
        return name.removeprefix(self.spec.layer_prefix(i))

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

    def install(self, i: int, factors: dict[str, Factors]) -> None:
        """Replace layer ``i``'s linears named in ``factors`` (full names) by LowRankLinears of their factors."""
        install_factors(self.layer(i), factors, prefix=self.spec.layer_prefix(i), device=self.factor_device)

    def release(self, i: int) -> None:
        """Free layer ``i``'s weights (the shard will not run it again)."""

    def close(self) -> None:
        """Free what the backend holds beyond the Python objects."""


class LayerwiseBackend(_Backend):
    """Layers in host memory, moved to the device per call (or kept there when the shard fits)."""

    def __init__(self, folder: str, layers: list[int], *, first: bool, dtype: str, device: torch.device) -> None:
        super().__init__(folder, layers, first=first, dtype=dtype, device=device)
        self.layers = {i: self._read_layer(i) for i in layers}
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

    def weights(self, i: int, plans: list[ModulePlan]) -> dict[str, np.ndarray]:
        """float32 weights (out, in) of the planned linears of layer ``i``, on the host."""
        layer = self.layers[i]
        return {p.name: weight_of(layer.get_submodule(self._local(i, p.name))).detach().float().cpu().numpy()
                for p in plans}

    def release(self, i: int) -> None:
        self.layers[i] = None  # type: ignore[assignment]


class _Layers(nn.Module):
    """The container ZeRO-3 wraps: the shard's layers by index; ``forward`` runs one of them."""

    def __init__(self, layers: dict[int, nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({str(i): m for i, m in layers.items()})

    def forward(self, key: str, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        return run_layer(self.layers[key], hidden, kwargs)


class DeepSpeedBackend(_Backend):
    """ZeRO-Inference: ZeRO stage 3 in a world of size 1, parameters offloaded to ``offload`` (cpu | nvme)."""

    def __init__(self, folder: str, layers: list[int], *, first: bool, dtype: str, device: torch.device,
                 offload: str = "cpu", nvme_path: str | None = None) -> None:
        super().__init__(folder, layers, first=first, dtype=dtype, device=device)
        deepspeed = init_world(device)
        largest = max(p.numel() for i in layers for p in decoder_layers(self.skeleton, self.spec)[i].parameters())
        self.config = ds_config(offload, nvme_path, pin=device.type == "cuda", largest_param=largest)
        built = {}
        for i in layers:  # partition each layer as it is read: at most one dense layer in host memory at a time
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

        mods = {p.name: self.layer(i).get_submodule(self._local(i, p.name)) for p in plans}
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
