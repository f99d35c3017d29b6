"""A layer-shard worker: owns a contiguous range of decoder layers and does their part of every lifecycle step –
calibration and decomposition, evaluation and generation, the automatic ratio's trials, drift scoring. A plain
class; the driver makes it a Ray actor (restartable: a restarted shard recomputes only what is not staged, and
every lifecycle call names the weights it needs, which a restarted shard installs again). Where the weights live
and how a layer runs on the device is the backend's business (``backends.py``); which weights the layers compute
with is ``shard_weights``'; this class only orchestrates.

Hidden states arrive one micro-batch per call as numpy arrays (zero-copy through Ray's object store) with the
layer keyword arguments the first shard captured. Calibration in ``original`` mode is batch-major (``forward``:
one micro-batch through every layer, so shards pipeline); ``propagate`` mode is layer-major (``calibrate``).
With the anchored fit the hidden states of a micro-batch are two streams, (2, b, t, d): the dense one and the
compressed one (the first shard starts both from its embeddings). The rank allocation's sensitivity pass runs the
other way (``backward``): the loss gradient at a shard's output comes from the next shard (from the head on the
last one) and the gradient at its input goes to the previous one.
"""

from __future__ import annotations

import functools
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from nesta_ray.checkpoint.stage import LayerStage
from nesta_ray.errors import ShardStateLost
from nesta_ray.io.sources import ModelSource
from nesta_ray.method.decompose import InputStats
from nesta_ray.model.calibration import GramAccumulator, InputStatistics
from nesta_ray.model.cross_calibration import run_two_streams
from nesta_ray.model.precision import forward_precision
from nesta_ray.model.sensitivity import ComponentFisher, backward_layers, forward_inputs, gradient_hooks, head_gradient
from nesta_ray.ops.evaluation import nll_sums
from nesta_ray.pipeline.backends import BackendSpec, ShardPart, open_backend, to_device
from nesta_ray.pipeline.faults import Fault
from nesta_ray.pipeline.precision import device_solver
from nesta_ray.pipeline.ray_env import actor_restarted
from nesta_ray.pipeline.shard_weights import DENSE, Weights, WeightsSwitch, staged
from nesta_ray.pipeline.tasks import Work, decompose_task
from nesta_ray.pipeline.uploads import BackgroundUploads

Batch = tuple[np.ndarray, dict[str, Any]]  # hidden states (b, t, d) and layer kwargs


@dataclass(frozen=True)
class ShardOptions:
    """How layer shards run: the model dtype, the forward backend, and (tests only) a fault to inject."""

    dtype: str = "float32"
    backend: BackendSpec = field(default_factory=BackendSpec)
    fault: Fault | None = None


class LayerShard:
    """The decoder layers of ``part`` of the model at ``source`` doing their part of ``work`` (its plan restricted
    to them), staging into ``stage`` (None for a shard that only scores: nothing is staged then).

    ``device`` overrides the compute device (default: the GPU this process sees, else the CPU).
    """

    def __init__(self, source: ModelSource, part: ShardPart, work: Work, stage: LayerStage | None,
                 options: ShardOptions | None = None, *, device: str | None = None) -> None:
        start = time.perf_counter()
        options = options or ShardOptions()
        torch.set_num_threads(work.threads)
        self.work, self.layers, self.part = work.subset(part.layers), part.layers, part
        self.plan, self.stage, self.fault = self.work.plan, stage, options.fault
        self.backend = open_backend(options.backend, source, part, dtype=options.dtype,
                                    device=None if device is None else torch.device(device))
        self.solver, self.solver_reason = device_solver(self.backend.device, self.work)
        self.switch = WeightsSwitch(self.backend, self.plan, self.work.method, self.work.threads, self.solver)
        self.grams: dict[int, dict[str, GramAccumulator]] = {}  # layer -> group -> fp64 sums on the host
        self.seen = 0  # micro-batches accumulated in order by ``forward``
        self.uploads = BackgroundUploads()  # a finished layer is staged while the next one is decomposed
        self.staged_at_start = self._staged()
        self.restarted = actor_restarted()  # Ray brought this shard back after its process died
        self.seconds = {"load": time.perf_counter() - start, "calibration": 0.0, "decomposition": 0.0,
                        "evaluation": 0.0, "drift": 0.0, "sensitivity": 0.0}
        self.computed: list[int] = []
        self.task_seconds: list[float] = []  # per linear, as measured inside the decomposition
        self.fishers: dict[str, ComponentFisher] = {}  # the sensitivity pass's sums, per planned linear
        self.backward_seen = 0  # micro-batches the sensitivity pass added, in order

    def _staged(self) -> set[int]:
        """The staged layers, once any upload in flight has landed."""
        self.uploads.wait()
        return self.stage.done() if self.stage is not None else set()

    def _fail(self, phase: str, layer: int) -> None:
        if self.fault is not None:
            self.fault.maybe_fail(phase, layer)

    def embed(self, ids: np.ndarray) -> Batch:
        """Token windows (b, L) of one micro-batch -> (hidden states entering layer 0, layer kwargs)."""
        hidden, kwargs = self.backend.embed(torch.from_numpy(ids))
        return hidden.numpy(), kwargs

    def _wanted(self, done: set[int]) -> dict[int, list[str]]:
        """Layers whose statistics are still needed, with their input groups."""
        return {i: list(self.plan.for_layer(i)) for i in self.layers if self.plan.for_layer(i) and i not in done}

    def _run(self, i: int, batches: list[tuple[torch.Tensor, dict]], record: bool) -> list[torch.Tensor]:
        """Layer ``i`` over ``batches`` (on the device), adding to its Grams when ``record``."""
        groups = self.plan.for_layer(i)
        modules = {g: m for g, m in self.backend.inputs_of(i).items() if g in groups} if record else {}
        accumulators = self.grams.setdefault(i, {}) if record else {}
        precision = self.work.calibration_precision
        with torch.no_grad(), self.backend.loaded(i), InputStatistics(modules, accumulators, precision=precision), \
                forward_precision(self.backend.device, precision):
            return [self.backend.run(i, h, kw) for h, kw in batches]

    def _on_device(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        hidden, kwargs = batch
        return torch.tensor(hidden, device=self.backend.device), to_device(kwargs, self.backend.device)

    def forward(self, index: int, batch: Batch, every_layer: bool = False) -> Batch:
        """Original-mode calibration on the dense layers: micro-batch ``index`` through every layer of the shard,
        adding to the Grams of layers not staged yet (``every_layer``: of every planned layer); returns the last
        layer's outputs for the next shard. Micro-batch 0 starts a new pass; micro-batches must come in order
        0, 1, ...; one that does not (a restarted shard that lost earlier ones) passes through without statistics
        and the closing call calibrates again from all inputs."""
        start = time.perf_counter()
        self.switch.ensure(DENSE)
        if index == 0:
            self.seen = 0
            self.grams.clear()
        record = index == self.seen
        wanted = self._wanted(set() if every_layer else self.staged_at_start) if record else {}
        hidden, kwargs = self._on_device(batch)
        for i in self.layers:
            hidden = self._run(i, [(hidden, kwargs)], i in wanted)[0]
        self.seen += record
        self.seconds["calibration"] += time.perf_counter() - start
        return hidden.cpu().numpy(), batch[1]

    def calibrate(self, *batches: Batch, every_layer: bool = False) -> Batch | tuple[Batch, ...]:
        """Every micro-batch through the shard one layer at a time, gathering the statistics of layers not staged
        yet (``every_layer``: of every planned layer, nothing compressed). In ``propagate`` mode each layer is
        compressed (or its staged factors installed) before its outputs are computed. Returns the shard's
        outputs, one per micro-batch (the value itself for one micro-batch, as Ray's ``num_returns=1`` expects)."""
        start = time.perf_counter()
        self.switch.ensure(DENSE)
        self.grams.clear()
        propagate = self.work.mode == "propagate" and self.stage is not None and not every_layer
        if propagate and self.work.method.anchored:
            return self._calibrate_anchored(batches)
        current = [self._on_device(b) for b in batches]
        done = set() if every_layer else self._staged()
        wanted = self._wanted(done)
        for i in self.layers:
            if propagate and i in done and self.plan.for_layer(i):
                assert self.stage is not None
                self.backend.install(i, self.stage.get(i))  # later layers must see this layer compressed
            outputs = self._run(i, current, i in wanted)
            if propagate and i in wanted:
                self.seconds["calibration"] += time.perf_counter() - start
                self._decompose_layer(i)
                start = time.perf_counter()
                outputs = self._run(i, current, record=False)
            current = [(out, kw) for out, (_, kw) in zip(outputs, current)]
        self.seen = len(batches)
        self.seconds["calibration"] += time.perf_counter() - start
        outs = tuple((h.cpu().numpy(), kw) for (h, _), (_, kw) in zip(current, batches))
        return outs[0] if len(outs) == 1 else outs

    def _calibrate_anchored(self, batches: tuple[Batch, ...]) -> Batch | tuple[Batch, ...]:
        """``calibrate`` with the anchored fit: per layer, both streams through the dense layer (the compressed
        stream's statistics paired with the dense one's inputs), decompose (or install the staged factors), then
        the compressed stream through the compressed layer. Returns (2, b, t, d) hidden states per micro-batch."""
        start = time.perf_counter()
        dense, compressed = [], []
        for hidden, kwargs in batches:
            pair = hidden if hidden.ndim == 4 else np.stack([hidden, hidden])  # the first shard: embeddings
            dense.append(self._on_device((pair[0], kwargs)))
            compressed.append(self._on_device((pair[1], kwargs)))
        done = self._staged()
        wanted = self._wanted(done)
        for i in self.layers:
            groups = self.plan.for_layer(i) if i in wanted else {}
            modules = {g: m for g, m in self.backend.inputs_of(i).items() if g in groups}
            with self.backend.loaded(i):
                dense_out, compressed_out, stats = run_two_streams(functools.partial(self.backend.run, i), modules,
                                                                   dense, compressed)
            if i in done and self.plan.for_layer(i):
                assert self.stage is not None
                self.backend.install(i, self.stage.get(i))
            elif groups:
                self.seconds["calibration"] += time.perf_counter() - start
                self._decompose_layer(i, stats)
                start = time.perf_counter()
            if self.plan.for_layer(i) and (i in done or groups):
                compressed_out = self._run(i, compressed, record=False)
            dense = [(out, kw) for out, (_, kw) in zip(dense_out, dense)]
            compressed = [(out, kw) for out, (_, kw) in zip(compressed_out, compressed)]
        self.seen = len(batches)
        self.seconds["calibration"] += time.perf_counter() - start
        outs = tuple((np.stack([d.cpu().numpy(), c.cpu().numpy()]), kw)
                     for (d, _), (c, _), (_, kw) in zip(dense, compressed, batches))
        return outs[0] if len(outs) == 1 else outs

    def _statistics(self, i: int) -> dict[str, InputStats]:
        """Layer ``i``'s normalised statistics per input group; its fp64 sums are freed."""
        return {group: acc.stats() for group, acc in self.grams.pop(i).items()}

    def _decompose_layer(self, i: int, stats: dict[str, InputStats] | None = None) -> None:
        """Decompose, install and stage layer ``i`` from ``stats`` (default: its accumulated Grams)."""
        assert self.stage is not None
        start = time.perf_counter()
        stats, factors = stats if stats is not None else self._statistics(i), {}
        for group, plans in self.plan.for_layer(i).items():
            part = decompose_task(self.backend.weights(i, plans), plans, self.work.method, stats[group],
                                  self.work.threads, self.solver)
            self.task_seconds += [f.seconds for f in part.values()]
            factors.update(part)
        self.backend.install(i, factors)  # the layer now computes with its factors, kept for evaluation
        self.uploads.wait()  # the previous layer is staged before this one may fail
        self._fail("decompose", i)  # a worker dying mid-layer: nothing of this layer is staged
        self.uploads.submit(self.stage.put, i, factors)
        self.computed.append(i)
        self.seconds["decomposition"] += time.perf_counter() - start

    def _complete(self, batches: tuple[Batch, ...], missing: list[int], every_layer: bool = False) -> None:
        """Calibrate again from all inputs when this shard did not see them all in order (it was restarted)."""
        if missing and (self.seen != len(batches) or any(i not in self.grams for i in missing)):
            self.calibrate(*batches, every_layer=every_layer)

    def decompose(self, *batches: Batch) -> dict[str, Any]:
        """Decompose and stage every planned layer not staged yet (``batches``, this shard's inputs, serve a
        restarted shard to calibrate again); the shard then computes with the stage's factors. Returns the
        layers computed here, the phase seconds and the peak memory."""
        assert self.stage is not None
        done = self._staged()
        missing = [i for i in self.layers if self.plan.for_layer(i) and i not in done]
        self._complete(batches, missing)
        for i in missing:
            if i in self.grams:
                self._decompose_layer(i)
        self.uploads.wait()  # every layer staged before the driver is told so
        for i in self.plan.layers():  # layers staged before (or in propagate mode) may still be dense here
            if i not in self.backend.dense:
                self.backend.install(i, self.stage.get(i))
        self.switch.adopt(staged(self.stage))
        return self.summary()

    def prepare(self, *batches: Batch) -> dict[str, Any]:
        """The automatic ratio: one scaled SVD per planned linear from the dense statistics that ``forward``
        gathered (``batches`` serve a restarted shard to calibrate again). Returns the summary."""
        start = time.perf_counter()
        self._complete(batches, list(self._wanted(set())), every_layer=True)
        self.switch.prepare({i: self._statistics(i) for i in list(self.grams)})
        self.seconds["decomposition"] += time.perf_counter() - start
        return self.summary()

    def ensure_prepared(self, *batches: Batch) -> bool:
        """Prepare again from ``batches`` (the inputs ``prepare`` had) when this shard lost its SVDs in a restart;
        returns whether it had to."""
        if self.switch.prepared:
            return False
        self.prepare(*batches)
        return True

    def stage_ratio(self, weights: Weights) -> list[int]:
        """Stage the factors of the chosen ratio (``weights`` of kind "ratio") for the layers not staged yet;
        returns those layers."""
        assert self.stage is not None
        todo = [i for i in self.plan.layers() if i not in self.stage.done()]
        factors = self.switch.at_ratio(dict(weights.ranks))
        for i in todo:
            self.stage.put(i, factors[i])
        return todo

    def _loaded_run(self, i: int, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        with self.backend.loaded(i):
            return self.backend.run(i, hidden, kwargs)

    def backward(self, index: int, batch: Batch, ids: np.ndarray | None = None,
                 grad: np.ndarray | None = None) -> np.ndarray:
        """The sensitivity pass on the dense layers (after ``prepare``): micro-batch ``index`` (0 starts a pass;
        they must come in order) back through the shard's layers from the gradient ``grad`` (b, t, d) at its
        output, or on the last shard from the summed next-token NLL of windows ``ids`` (b, L), adding each planned
        linear's gradient projections. Returns the gradient (b, t, d) at the shard's input (empty on the first
        shard: nothing needs it). Raises ShardStateLost when a restart lost the SVDs or earlier micro-batches."""
        start = time.perf_counter()
        self.switch.ensure(DENSE)
        if index == 0:
            self.fishers, self.backward_seen = self.switch.fishers(self.backend.device), 0
        if index != self.backward_seen or not self.fishers:
            raise ShardStateLost("a layer shard was restarted during the sensitivity pass")
        hidden, kwargs = self._on_device(batch)
        runs = [functools.partial(self._loaded_run, i) for i in self.layers]
        inputs, out = forward_inputs(runs, hidden, kwargs)
        if self.part.last:
            assert ids is not None
            g, _ = head_gradient(self.backend.logits, out, torch.from_numpy(ids))
        else:
            assert grad is not None
            g = torch.tensor(grad, device=self.backend.device)
        g = backward_layers(runs, inputs, kwargs, g,
                            lambda k: gradient_hooks(self.switch.linears(self.layers[k]), self.fishers))
        self.backward_seen += 1
        self.seconds["sensitivity"] += time.perf_counter() - start
        return np.zeros(0, np.float32) if self.part.first else g.cpu().numpy()

    def curves(self, passes: int) -> dict[str, np.ndarray]:
        """Each planned linear's sensitivity curve from the ``passes`` micro-batches ``backward`` added. Raises
        ShardStateLost when this shard added fewer (a restart during the pass)."""
        if self.backward_seen != passes or not self.fishers:
            raise ShardStateLost("a layer shard was restarted during the sensitivity pass")
        return self.switch.curves(self.fishers)

    def infer(self, batch: Batch, weights: Weights, targets: np.ndarray | None = None,
              phase: str = "evaluate") -> Batch | np.ndarray:
        """One micro-batch through the shard's layers computing with ``weights``: the outputs for the next shard;
        on the last shard, the summed next-token NLL (b,) of windows ``targets`` (b, L), or without targets the
        arg-max next token (b,) after each sequence. ``phase`` names the step for fault injection."""
        start = time.perf_counter()
        self.switch.ensure(weights)
        hidden, kwargs = self._on_device(batch)
        with torch.no_grad():
            for i in self.layers:
                self._fail("auto_ratio" if weights.kind == "ratio" else phase, i)
                with self.backend.loaded(i):
                    hidden = self.backend.run(i, hidden, kwargs)
            out: Batch | np.ndarray = (hidden.cpu().numpy(), batch[1])
            if self.part.last:
                logits = self.backend.logits(hidden)  # (b, t, V)
                out = (nll_sums(logits, torch.from_numpy(targets).to(logits.device)) if targets is not None
                       else logits[:, -1].argmax(dim=-1)).cpu().numpy()
        self.seconds["evaluation"] += time.perf_counter() - start
        return out

    def drift(self, weights: Weights, *batches: Batch) -> dict[str, float]:
        """Relative output error tr(Δ·G·Δᵀ)/tr(W·G·Wᵀ) of each of the shard's linears under the Grams that
        ``forward`` gathered on the dense layers (``batches`` serve a restarted shard to calibrate again), for
        the factors of the run ``weights`` names."""
        start = time.perf_counter()
        self._complete(batches, list(self._wanted(set())), every_layer=True)
        published = self.switch.run_factors(weights)
        errors: dict[str, float] = {}
        for i in self.plan.layers():
            self._fail("drift", i)
            errors.update(self.switch.errors(i, self._statistics(i), published[i]))
        self.seconds["drift"] += time.perf_counter() - start
        return errors

    def summary(self) -> dict[str, Any]:
        """The layers computed here, the phase seconds, the peak memory and the device."""
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
        device = self.backend.device
        return {"computed": list(self.computed), "seconds": dict(self.seconds), "peak_rss_bytes": peak_kib * 1024,
                "peak_device_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                "device": str(device), "decompose_seconds": sum(self.task_seconds), "restarted": self.restarted,
                "bytes_read": self.backend.store.bytes_read, "decompose_precision": self.solver_reason}

    def close(self) -> None:
        """Free the backend (DeepSpeed's engine); the actor is killed after."""
        self.backend.close()
