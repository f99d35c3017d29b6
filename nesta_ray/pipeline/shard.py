"""A layer-shard worker: owns a contiguous range of decoder layers, reads only their weights, calibrates them
layer by layer over every micro-batch, decomposes them and stages each finished layer. A plain class; the driver
makes it a Ray actor (restartable: a restarted shard recomputes only the layers that are not staged).

Weights stream from the source's safetensors files (memory-mapped ``safe_open``: only this shard's tensors are
read). Hidden states arrive as numpy arrays (zero-copy through Ray's object store) with the layer keyword
arguments the first shard captured.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nesta_ray.models import ArchSpec, arch_for, capture_layer_inputs, decoder_layers, run_layer
from nesta_ray.pipeline.layerwise import MethodArgs, group_weights, install_factors, run_with_statistics
from nesta_ray.pipeline.plan import Plan
from nesta_ray.pipeline.staging import LayerStage
from nesta_ray.pipeline.tasks import decompose_group_arrays
from nesta_ray.sources import read_tensors, weight_files

Batch = tuple[np.ndarray, dict[str, Any]]  # hidden states (b, t, d) and layer kwargs


@dataclass(frozen=True)
class StageRef:
    """Where a shard stages its layers (plain values, so the shard can be constructed in any process)."""

    root_uri: str
    fingerprint: str
    storage_options: dict | None = None

    def open(self) -> LayerStage:
        return LayerStage(self.root_uri, self.fingerprint, self.storage_options)


class LayerShard:
    """Decoder layers ``layers`` of the model in ``folder``; the first shard also embeds the token ids.

    ``fail_at_layer`` (fault injection for tests) makes the process exit once, just before staging that layer.
    """

    def __init__(self, folder: str, layers: list[int], plan: Plan, *, first: bool, dtype: str, args: MethodArgs,
                 mode: str, stage: StageRef, fail_at_layer: int | None = None) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        start = time.perf_counter()
        torch.set_num_threads(args.threads)
        self.args, self.mode, self.layers, self.plan = args, mode, layers, plan
        self.stage, self.fail_at_layer = stage.open(), fail_at_layer
        config = AutoConfig.from_pretrained(folder)
        self.spec: ArchSpec = arch_for(config.model_type)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        files = weight_files(folder)
        backbone_path = self.spec.layers.rsplit(".", 1)[0]
        all_layers = decoder_layers(self.model, self.spec)
        for i in layers:
            self._materialise(folder, files, all_layers[i], f"{self.spec.layers}.{i}.")
        if first:
            backbone = self.model.get_submodule(backbone_path)
            self._materialise(folder, files, backbone.embed_tokens, f"{backbone_path}.embed_tokens.")
            backbone.rotary_emb = type(backbone.rotary_emb)(config=config)  # its buffers are computed, not stored
        self.stats: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        self.seconds = {"load": time.perf_counter() - start, "calibration": 0.0, "decomposition": 0.0}
        self.computed: list[int] = []
        self.task_seconds: list[float] = []  # per linear, as measured inside the decomposition

    @staticmethod
    def _materialise(folder: str, files: dict[str, str], module: torch.nn.Module, prefix: str) -> None:
        module.to_empty(device="cpu")
        module.load_state_dict(read_tensors(folder, prefix, files), strict=True)

    def embed(self, ids: np.ndarray, micro_batch: int) -> list[Batch]:
        """Token windows (N, L) -> per micro-batch (hidden states entering layer 0, layer kwargs)."""
        out = []
        with torch.no_grad():
            for i in range(0, ids.shape[0], micro_batch):
                hidden, kwargs = capture_layer_inputs(self.model, self.spec, torch.from_numpy(ids[i : i + micro_batch]))
                out.append((hidden.numpy(), kwargs))
        return out

    def calibrate(self, batches: list[Batch]) -> list[Batch]:
        """Run every micro-batch through this shard's layers, one layer at a time, gathering the input statistics
        of layers not yet staged. In ``propagate`` mode each layer is compressed (or its staged factors installed)
        before its outputs are computed. Returns the outputs of the shard's last layer, for the next shard."""
        start = time.perf_counter()
        current = [(torch.from_numpy(h.copy()), kw) for h, kw in batches]
        layers = decoder_layers(self.model, self.spec)
        done = self.stage.done()
        for i in self.layers:
            groups = self.plan.for_layer(i)
            outputs, grams, abs_means = run_with_statistics(layers[i], self.spec, {} if i in done else groups, current)
            if grams:
                self.stats[i] = {g: (grams[g], abs_means[g]) for g in grams}
            if self.mode == "propagate" and groups:
                self.seconds["calibration"] += time.perf_counter() - start
                if i in done:
                    install_factors(self.model, self.stage.get(i))
                else:
                    self._decompose_layer(i)
                start = time.perf_counter()
                with torch.no_grad():
                    outputs = [run_layer(layers[i], h, kw) for h, kw in current]
            current = [(out, kw) for out, (_, kw) in zip(outputs, current)]
        self.seconds["calibration"] += time.perf_counter() - start
        return [(h.numpy(), kw) for h, kw in current]

    def _decompose_layer(self, i: int) -> None:
        start = time.perf_counter()
        a, layer_results = self.args, {}
        for group, plans in self.plan.for_layer(i).items():
            gram, abs_mean = self.stats[i].pop(group)
            part = decompose_group_arrays(group_weights(self.model, plans), {p.name: p.rank for p in plans},
                                          a.method, gram, abs_mean, a.k1_fraction, a.damping, a.alpha, a.threads)
            self.task_seconds += [r["seconds"] for r in part.values()]
            layer_results.update(part)
        del self.stats[i]
        install_factors(self.model, layer_results)
        if self.fail_at_layer == i and self.stage.mark(f"fault-injected-{i}"):
            os._exit(1)  # simulate a worker dying mid-layer: nothing of this layer is staged
        self.stage.put(i, layer_results)
        self.computed.append(i)
        self.seconds["decomposition"] += time.perf_counter() - start

    def decompose(self, batches: list[Batch]) -> dict[str, Any]:
        """Decompose and stage every planned layer not staged yet. ``batches`` are this shard's inputs: a
        restarted shard has lost its statistics and calibrates again before decomposing. Returns the layers
        computed here and the phase seconds."""
        missing = [i for i in self.layers if self.plan.for_layer(i) and i not in self.stage.done()]
        if any(i not in self.stats for i in missing):
            self.calibrate(batches)
        for i in missing:
            if i in self.stats:
                self._decompose_layer(i)
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
        return {"computed": list(self.computed), "seconds": dict(self.seconds), "peak_rss_bytes": peak_kib * 1024,
                "decompose_seconds": sum(self.task_seconds)}
