"""Sizing a job before it runs: layer ranges per shard, memory peaks, bytes moved and the work (FLOPs) of each
actor, and the check that refuses a job that cannot fit. Pure: no I/O, no Ray."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nesta_ray.config.schema import CalibrationConfig, JobConfig
from nesta_ray.errors import ConfigError
from nesta_ray.method.factorize import Solver, flops, solver_for
from nesta_ray.plan.linears import ModulePlan, Plan


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only model that size a job (from its config.json and its parameter count):
    ``layer_params`` is one decoder layer's parameters (the model's, less the embedding and the head, per
    layer, rounded down) and ``tail_params`` the rest (the final norm and the rounding), which the last shard
    holds."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int
    dtype_bytes: int
    tied: bool
    layer_params: int
    tail_params: int

    @classmethod
    def of(cls, hf_config: Any, dtype_bytes: int, model_params: int) -> ModelShape:
        """From a transformers config and the model's parameter count (tied tensors once)."""
        tied = bool(getattr(hf_config, "tie_word_embeddings", False))
        table = hf_config.vocab_size * hf_config.hidden_size * (1 if tied else 2)
        layers = hf_config.num_hidden_layers
        per_layer = (model_params - table) // layers
        return cls(hf_config.hidden_size, hf_config.intermediate_size, layers, hf_config.vocab_size, dtype_bytes,
                   tied, per_layer, model_params - table - per_layer * layers)


@dataclass(frozen=True)
class ShardSize:
    """One layer-shard actor as the pipeline holds it: its layers, bytes, memory peaks and work."""

    actor: int
    layers: list[int]
    params: int  # its decoder layers' parameters, dense
    params_after: int  # the same compressed
    last: bool  # holds the final norm and the head
    weights_bytes: int
    device_peak_bytes: int
    host_peak_bytes: int
    object_store_bytes: int
    read_bytes: int
    write_bytes: int  # its staged factors (float32)
    factor_bytes: int  # its factors as the checkpoint stores them (the dtype of the weights they replace)
    checkpoint_bytes: int  # its part of the written checkpoint: factors and every tensor kept dense
    calibration_flops: float  # the forward and the Gram products
    decomposition_flops: float  # the sum of decomposition_work
    gram_flops: float = 0.0  # the Gram products' share of calibration_flops
    decomposition_work: dict[str, float] = field(default_factory=dict)  # FLOPs by kind (factorize.flops)
    copy_bytes: int = 0  # host <-> device: the fp64 Grams to the device, the factors back

    @property
    def label(self) -> str:
        """Its layer range, e.g. "0-9"."""
        return f"{self.layers[0]}-{self.layers[-1]}"


def shard_ranges(num_layers: int, workers: int) -> list[list[int]]:
    """Contiguous, balanced layer ranges for ``workers`` shards (ValueError if there are more shards than layers)."""
    if not 1 <= workers <= num_layers:
        raise ValueError(f"workers must be in [1, {num_layers}] for {num_layers} layers to calibrate, got {workers}")
    return [list(map(int, part)) for part in np.array_split(np.arange(num_layers), workers)]


def svd_flops(m: int, n: int) -> float:
    """Work model of a dense SVD of an (m, n) matrix (Golub–Van Loan's leading terms for U, Σ, V)."""
    small, large = min(m, n), max(m, n)
    return 4.0 * large * small * small + 22.0 * small**3


def decomposition_work(mods: list[ModulePlan], solver: Solver) -> dict[str, float]:
    """FLOPs by kind of decomposing ``mods`` with ``solver`` (``factorize.flops``; one Cholesky per input group, as
    the group shares its whitening). A nested linear whose k1 is chosen per matrix is counted with k2 = 0.5% of its
    rank (at least 1), what the k1 tolerance leaves on the real models."""
    work: dict[str, float] = {}
    for p in mods:
        k2 = p.split[1] if p.split is not None else (max(1, round(0.005 * p.rank)) if p.residual_svd else 0)
        for kind, f in flops(p.m, p.n, p.rank, k2, solver).items():
            work[kind] = work.get(kind, 0.0) + f
    work["cholesky"] = sum(n**3 / 3.0 for n in {(p.layer, p.group): p.n for p in mods}.values())
    return work


def _gram_bytes(widths: set[tuple[str, int]]) -> int:
    return sum(8 * n * n + 8 * n for _, n in widths)


def svd_keep_bytes(p: ModulePlan) -> int:
    """Bytes one linear's kept scaled SVD takes in fp64 (U (m, r), σ, Vᵀ (r, n), r = min(m, n)), as the automatic
    ratio holds it for every tried ratio."""
    r = min(p.m, p.n)
    return 8 * r * (p.m + p.n + 1)


def memory_estimate(plan: Plan, shape: ModelShape, cal: CalibrationConfig) -> dict[str, int]:
    """Bytes the embedded job holds at its peak: weights, calibration hidden states, one layer's Grams, and the
    activations of one micro-batch inside a layer (the widest being the MLP's intermediate)."""
    widths: dict[int, set[tuple[str, int]]] = {}
    for p in plan.modules:
        widths.setdefault(p.layer, set()).add((p.group, p.n))
    per_layer = [_gram_bytes(w) for w in widths.values()]
    return {
        "weights": plan.model_params * shape.dtype_bytes,
        "hidden_states": 2 * cal.num_sequences * cal.seq_len * shape.hidden * 4,
        "grams_one_layer": max(per_layer, default=0),
        "grams_all_layers": sum(per_layer),
        "micro_batch_activations": 4 * cal.micro_batch * cal.seq_len * shape.intermediate * 4,
    }


def _shard(actor: int, layers: list[int], by_layer: dict[int, list[ModulePlan]], shape: ModelShape,
           cfg: JobConfig, host_weights: bool) -> ShardSize:
    cal, last = cfg.calibration, layers[-1] == shape.layers - 1
    tokens, h = cal.num_sequences * cal.seq_len, shape.hidden
    mods = [p for i in layers for p in by_layer.get(i, [])]
    widths = {i: {(p.group, p.n) for p in by_layer.get(i, [])} for i in layers}  # one Gram per input group
    layer_params = [sum(p.params_before for p in by_layer.get(i, [])) for i in layers]
    grams = [_gram_bytes(widths[i]) for i in layers]
    widest_input = max((n for i in layers for _, n in widths[i]), default=0)
    widest = max(mods, key=lambda p: p.m * p.n, default=None)
    svd_workspace = 0 if widest is None else 8 * (3 * widest.m * widest.n + 4 * widest.n * widest.n)
    head = (shape.vocab * h + shape.tail_params) * shape.dtype_bytes if last else 0  # and the final norm
    embedding = shape.vocab * h * shape.dtype_bytes if actor == 0 else 0
    params = len(layers) * shape.layer_params
    params_after = params - sum(p.params_before for p in mods) + sum(p.params_after for p in mods)
    weights = params * shape.dtype_bytes + embedding + head
    factors = sum(p.params_after for p in mods) * shape.dtype_bytes  # installed beside the kept dense linears
    svds = sum(svd_keep_bytes(p) for p in mods) if cfg.method.auto else 0
    work = decomposition_work(mods, solver_for(cfg.runtime.factorization))
    gram_flops = sum(2.0 * n * n * tokens for i in layers for _, n in widths[i])
    logits = cfg.evaluation.batch_size * cfg.evaluation.seq_len * shape.vocab * 4 if last else 0
    activations = cal.micro_batch * cal.seq_len * (4 * h + 3 * shape.intermediate) * 4
    hidden = 2 * (cal.micro_batch * cal.seq_len if cal.mode == "original" else tokens) * h * 4
    return ShardSize(
        actor=actor, layers=layers, params=params, params_after=params_after, last=last, weights_bytes=weights,
        device_peak_bytes=max(layer_params, default=0) * shape.dtype_bytes + max(activations, logits) + head
        + 4 * widest_input * widest_input,
        host_peak_bytes=(weights if host_weights else embedding + head) + factors + svds + hidden + svd_workspace
        + (sum(grams) if cal.mode == "original" else max(grams, default=0)),
        object_store_bytes=tokens * h * 4, read_bytes=weights,
        write_bytes=sum(p.params_after for p in mods) * 4, factor_bytes=factors,
        checkpoint_bytes=weights - sum(p.params_before for p in mods) * shape.dtype_bytes + factors,
        calibration_flops=2.0 * sum(layer_params) * tokens + gram_flops, gram_flops=gram_flops,
        decomposition_flops=sum(work.values()), decomposition_work=work,
        copy_bytes=sum(8 * n * n for i in layers for _, n in widths[i]) + sum(p.params_after for p in mods) * 4,
    )


def shard_sizes(plan: Plan, shape: ModelShape, ranges: list[list[int]], cfg: JobConfig, *,
                host_weights: bool = True) -> list[ShardSize]:
    """Per layer-shard actor: its layers, weights, device and host memory peaks, bytes moved and work.

    Device peak (one layer on the device at a time, as both backends stream): one layer's weights + the larger of
    one micro-batch's activations and (last shard) one evaluation batch's logits + the head (last shard) + the
    fp32 Gram product (n, n) of its widest input, which is then summed into fp64 on the host. Host peak: the
    shard's weights (``host_weights``; False for NVMe offload) with the embedding (first shard) and the head (last
    shard); the installed factors, kept beside the dense linears for evaluation and drift; with ``ratio: auto``
    every linear's kept scaled SVD; the fp64 Gram sums waiting for decomposition (original mode: every layer of
    the shard, as micro-batches pipeline through all of them; propagate: one layer); hidden states in and out
    (original: one micro-batch; propagate, layer-major: every window); and the decomposition of the widest linear
    on the CPU (its normalised Gram plus the SVD workspace: the fp64 matrix, its Gram-sized whitening, U and V).
    The shard's inputs also wait in Ray's object store until it has decomposed (``object_store_bytes``), so that
    a restarted shard can calibrate again. Decomposition work is ``decomposition_work`` with the job's
    ``runtime.factorization``.
    """
    by_layer: dict[int, list[ModulePlan]] = {}
    for p in plan.modules:
        by_layer.setdefault(p.layer, []).append(p)
    return [_shard(k, layers, by_layer, shape, cfg, host_weights) for k, layers in enumerate(ranges)]


def check_fit(shards: list[ShardSize], device_limit: float | None, host_limit: float | None) -> None:
    """Raise ValueError naming the first actor whose device or host peak exceeds its limit (bytes), and the fix."""
    fixes = {"device": "lower calibration.micro_batch (one layer is on the device at a time, so more workers do "
                       "not help)",
             "host": "raise runtime.workers (fewer layers per shard) or lower calibration.micro_batch / "
                     "calibration.num_sequences"}
    for s in shards:
        for need, limit, where in ((s.device_peak_bytes, device_limit, "device"), (s.host_peak_bytes, host_limit,
                                                                                   "host")):
            if limit is not None and need > limit:
                raise ValueError(
                    f"actor {s.actor} (layers {s.label}) needs {need / 2**30:.1f} GiB of {where} memory, "
                    f"more than the {limit / 2**30:.1f} GiB available; {fixes[where]}"
                )


def shard_plan(cfg: JobConfig, plan: Plan, hf_config: Any) -> list[ShardSize]:
    """Per-actor sizes for ``runtime.workers`` layer shards. Raises ConfigError when the shards cannot be formed or
    one exceeds ``runtime.device_memory_gb`` / ``host_memory_gb``."""
    rt = cfg.runtime
    shape = ModelShape.of(hf_config, dtype_bytes(cfg.model.dtype), plan.model_params)
    try:
        shards = shard_sizes(plan, shape, shard_ranges(shape.layers, rt.workers), cfg,
                             host_weights=not (rt.backend == "deepspeed" and rt.offload == "nvme"))
        check_fit(shards, *[None if v is None else v * 2**30 for v in (rt.device_memory_gb, rt.host_memory_gb)])
    except ValueError as err:
        raise ConfigError(f"runtime: {err}") from None
    return shards


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a config dtype name ("float32", "bfloat16", "float16")."""
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
