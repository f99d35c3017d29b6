"""A layer-shard worker: owns a contiguous range of decoder layers, reads only their weights, calibrates them
layer by layer over every micro-batch, and decomposes them. A plain class; the driver makes it a Ray actor.

Weights stream from the source's safetensors files (memory-mapped ``safe_open``: only this shard's tensors are
read). Hidden states arrive as numpy arrays (zero-copy through Ray's object store) with the layer keyword
arguments the first worker captured.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from nesta_ray.calibration import InputStatistics
from nesta_ray.models import ArchSpec, arch_for, capture_layer_inputs, decoder_layers, group_inputs, run_layer
from nesta_ray.pipeline.layerwise import MethodArgs, install_factors
from nesta_ray.pipeline.plan import Plan
from nesta_ray.pipeline.tasks import decompose_group_arrays

Batch = tuple[np.ndarray, dict[str, Any]]  # hidden states (b, t, d) and layer kwargs


def _weight_files(folder: str) -> dict[str, str]:
    """Tensor name -> safetensors file, from the index (or the single model.safetensors)."""
    index = Path(folder) / "model.safetensors.index.json"
    if index.is_file():
        return {k: str(Path(folder) / f) for k, f in json.loads(index.read_text())["weight_map"].items()}
    single = Path(folder) / "model.safetensors"
    with safe_open(str(single), "pt") as f:
        return {k: str(single) for k in f.keys()}


def read_tensors(folder: str, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor whose name starts with ``prefix``, keyed without it; nothing else is read."""
    files = _weight_files(folder)
    out: dict[str, torch.Tensor] = {}
    for path in sorted({f for k, f in files.items() if k.startswith(prefix)}):
        with safe_open(path, "pt") as f:
            for key in f.keys():
                if key.startswith(prefix):
                    out[key[len(prefix):]] = f.get_tensor(key)
    return out


class LayerShard:
    """Decoder layers ``layers`` of the model in ``folder``; the first shard also embeds the token ids."""

    def __init__(self, folder: str, layers: list[int], plan: Plan, *, first: bool, dtype: str,
                 args: MethodArgs, mode: str) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        start = time.perf_counter()
        torch.set_num_threads(args.threads)
        self.args, self.mode, self.layers = args, mode, layers
        self.plan = plan  # the planned linears of this shard's layers
        config = AutoConfig.from_pretrained(folder)
        self.spec: ArchSpec = arch_for(config.model_type)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        backbone = self.model.get_submodule(self.spec.layers.rsplit(".", 1)[0])
        self._load(folder, self.spec.layers, layers)
        if first:
            self._materialise(folder, backbone.embed_tokens, f"{self.spec.layers.rsplit('.', 1)[0]}.embed_tokens.")
            backbone.rotary_emb = type(backbone.rotary_emb)(config=config)  # buffers computed, not stored
        self.stats: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        self.results: dict[str, dict] = {}
        self.seconds = {"load": time.perf_counter() - start, "calibration": 0.0, "decomposition": 0.0}

    def _materialise(self, folder: str, module: torch.nn.Module, prefix: str) -> None:
        module.to_empty(device="cpu")
        module.load_state_dict(read_tensors(folder, prefix), strict=True)

    def _load(self, folder: str, layers_path: str, layers: list[int]) -> None:
        all_layers = decoder_layers(self.model, self.spec)
        for i in layers:
            self._materialise(folder, all_layers[i], f"{layers_path}.{i}.")

    def embed(self, ids: np.ndarray, micro_batch: int) -> list[Batch]:
        """Token windows (N, L) -> per micro-batch (hidden states entering layer 0, layer kwargs)."""
        out = []
        with torch.no_grad():
            for i in range(0, ids.shape[0], micro_batch):
                hidden, kwargs = capture_layer_inputs(self.model, self.spec, torch.from_numpy(ids[i : i + micro_batch]))
                out.append((hidden.numpy(), kwargs))
        return out

    def calibrate(self, batches: list[Batch]) -> list[Batch]:
        """Run every micro-batch through this shard's layers, one layer at a time, gathering input statistics.

        In ``propagate`` mode each layer is decomposed and replaced before its outputs are computed.
        Returns the outputs of the shard's last layer, for the next shard.
        """
        start = time.perf_counter()
        hidden = [torch.from_numpy(h.copy()) for h, _ in batches]
        kwargs = [kw for _, kw in batches]
        layers = decoder_layers(self.model, self.spec)
        for i in self.layers:
            groups = self.plan.for_layer(i)
            with torch.no_grad(), InputStatistics({g: m for g, m in group_inputs(layers[i], self.spec).items()
                                                  if g in groups}) as stats:
                outputs = [run_layer(layers[i], h, kw) for h, kw in zip(hidden, kwargs)]
            self.stats[i] = {g: (a.gram().numpy(), a.abs_mean().numpy()) for g, a in stats.accumulators.items()}
            if self.mode == "propagate":
                self.seconds["calibration"] += time.perf_counter() - start
                self._decompose_layer(i)
                start = time.perf_counter()
                with torch.no_grad():
                    outputs = [run_layer(layers[i], h, kw) for h, kw in zip(hidden, kwargs)]
            hidden = outputs
        self.seconds["calibration"] += time.perf_counter() - start
        return [(h.numpy(), kw) for h, kw in zip(hidden, kwargs)]

    def _decompose_layer(self, i: int) -> None:
        start = time.perf_counter()
        for group, plans in self.plan.for_layer(i).items():
            gram, abs_mean = self.stats[i].pop(group)
            weights = {p.name: self.model.get_submodule(p.name).weight.detach().float().numpy() for p in plans}
            a = self.args
            res = decompose_group_arrays(weights, {p.name: p.rank for p in plans}, a.method, gram, abs_mean,
                                         a.k1_fraction, a.damping, a.alpha, a.threads)
            install_factors(self.model, res)
            self.results.update(res)
        self.seconds["decomposition"] += time.perf_counter() - start

    def decompose(self) -> dict[str, dict]:
        """Decompose every layer whose statistics are gathered (original mode); returns all results so far."""
        for i in self.layers:
            if self.stats.get(i):
                self._decompose_layer(i)
        return self.results

    def timings(self) -> dict[str, float]:
        return dict(self.seconds)
