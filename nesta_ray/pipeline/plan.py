"""The compression plan: which linears, at which rank, and what the job will cost. Pure: no I/O, no Ray."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from nesta_ray.decompose import rank_for_ratio, split_rank
from nesta_ray.models import ArchSpec, decoder_layers, layer_linears


@dataclass(frozen=True)
class ModulePlan:
    """One linear to compress: its full name, layer, input group, shape (out m, in n) and rank."""

    name: str
    layer: int
    group: str
    m: int
    n: int
    rank: int
    k1: int
    k2: int

    @property
    def params_before(self) -> int:
        return self.m * self.n

    @property
    def params_after(self) -> int:
        return self.rank * (self.m + self.n)


@dataclass(frozen=True)
class Plan:
    """Every linear to compress, in layer order, with the totals a dry run prints."""

    modules: list[ModulePlan]
    model_params: int

    @property
    def params_before(self) -> int:
        return sum(p.params_before for p in self.modules)

    @property
    def params_after(self) -> int:
        return sum(p.params_after for p in self.modules)

    def layers(self) -> list[int]:
        return sorted({p.layer for p in self.modules})

    def for_layer(self, layer: int) -> dict[str, list[ModulePlan]]:
        """The layer's planned linears by input group."""
        groups: dict[str, list[ModulePlan]] = {}
        for p in self.modules:
            if p.layer == layer:
                groups.setdefault(p.group, []).append(p)
        return groups

    def as_dict(self) -> dict:
        return {"modules": [asdict(p) for p in self.modules], "model_params": self.model_params,
                "params_before": self.params_before, "params_after": self.params_after}


def make_plan(
    model: nn.Module, spec: ArchSpec, *, method: str, ratio: float, k1_fraction: float, targets: list[str],
    layers: list[int] | None = None, rank_overrides: dict[str, int] | None = None,
) -> Plan:
    """Plan for ``model`` (real or on the meta device). Raises ValueError for an override naming no planned linear
    or a layer index out of range."""
    overrides = dict(rank_overrides or {})
    all_layers = decoder_layers(model, spec)
    chosen = range(len(all_layers)) if layers is None else layers
    bad = [i for i in chosen if not 0 <= i < len(all_layers)]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {len(all_layers)} decoder layers")
    modules = []
    for i in chosen:
        for path, lin in layer_linears(all_layers[i], spec, targets).items():
            name = f"{spec.layers}.{i}.{path}"
            m, n = lin.weight.shape
            rank = overrides.pop(name, None) or rank_for_ratio(m, n, ratio)
            if rank > min(m, n):
                raise ValueError(f"rank override {rank} for {name} exceeds min(out, in) = {min(m, n)}")
            k1, k2 = split_rank(rank, k1_fraction) if method.startswith("nsvd") else (rank, 0)
            modules.append(ModulePlan(name, i, spec.group_of(path.rsplit(".", 1)[-1]), m, n, rank, k1, k2))
    if overrides:
        raise ValueError(f"rank_overrides name linears that are not planned: {sorted(overrides)[:3]}")
    return Plan(modules, sum(p.numel() for p in model.parameters()))


def memory_estimate(plan: Plan, *, hidden: int, sequences: int, seq_len: int, micro_batch: int,
                    intermediate: int, dtype_bytes: int) -> dict[str, int]:
    """Bytes the embedded job holds at its peak: weights, calibration hidden states, one layer's Grams, and the
    activations of one micro-batch inside a layer (the widest being the MLP's intermediate)."""
    widths = {(p.layer, p.group): p.n for p in plan.modules}
    per_layer: dict[int, int] = {}
    for (layer, _), n in widths.items():
        per_layer[layer] = per_layer.get(layer, 0) + n * n * 8 + n * 8
    return {
        "weights": plan.model_params * dtype_bytes,
        "hidden_states": 2 * sequences * seq_len * hidden * 4,
        "grams_one_layer": max(per_layer.values(), default=0),
        "grams_all_layers": sum(per_layer.values()),
        "micro_batch_activations": 4 * micro_batch * seq_len * intermediate * 4,
    }


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only model that size a job (from its config.json)."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int
    dtype_bytes: int
    tied: bool


@dataclass(frozen=True)
class Rates:
    """Throughputs for time estimates: fp32 matmul and fp64 SVD in GFLOP/s, storage reads/writes in GB/s."""

    matmul_gflops: float
    svd_gflops: float
    read_gbps: float = 1.0
    write_gbps: float = 0.5


def svd_flops(m: int, n: int) -> float:
    """Work model of a dense SVD of an (m, n) matrix (Golub–Van Loan's leading terms for U, Σ, V)."""
    small, large = min(m, n), max(m, n)
    return 4.0 * large * small * small + 22.0 * small**3


def shard_report(plan: Plan, shape: ModelShape, ranges: list[list[int]], *, sequences: int, seq_len: int,
                 micro_batch: int, mode: str, rates: Rates | None = None, host_weights: bool = True) -> list[dict]:
    """Per layer-shard actor: its layers, weights, device and host memory peaks, bytes moved, and time estimates.

    Device peak (one layer on the device at a time, as both backends stream): one layer's weights + one
    micro-batch's activations + the fp32 Gram product (n, n) of its widest input, which is then summed into fp64 on
    the host. Host peak: the shard's weights (``host_weights``; False for NVMe offload) and, on the first shard,
    the embedding; the fp64 Gram sums waiting for decomposition (original mode: every layer of the shard, as
    micro-batches pipeline through all of them; propagate: one layer); hidden states in and out (original: one
    micro-batch; propagate, layer-major: every window); and the decomposition of the widest linear on the CPU
    (its normalised Gram plus the SVD workspace: the fp64 matrix, its Gram-sized whitening, U and V). The
    shard's inputs also wait in Ray's object store until it has decomposed (``object_store_bytes``), so that a
    restarted shard can calibrate again. Time estimates (seconds) are added when ``rates`` is given.
    """
    tokens = sequences * seq_len
    h, i_ = shape.hidden, shape.intermediate
    by_layer: dict[int, list[ModulePlan]] = {}
    for p in plan.modules:
        by_layer.setdefault(p.layer, []).append(p)
    out = []
    for k, layers in enumerate(ranges):
        mods = [p for i in layers for p in by_layer.get(i, [])]
        widths = {i: {(p.group, p.n) for p in by_layer.get(i, [])} for i in layers}  # one Gram per input group
        layer_params = [sum(p.params_before for p in by_layer.get(i, [])) for i in layers]
        grams = [sum(8 * n * n + 8 * n for _, n in widths[i]) for i in layers]
        widest_input = max((n for i in layers for _, n in widths[i]), default=0)
        widest = max(mods, key=lambda p: p.m * p.n, default=None)
        svd_workspace = 0 if widest is None else 8 * (3 * widest.m * widest.n + 4 * widest.n * widest.n)
        embedding = shape.vocab * h * shape.dtype_bytes if k == 0 else 0
        weights = sum(layer_params) * shape.dtype_bytes + embedding
        activations = micro_batch * seq_len * (4 * h + 3 * i_) * 4
        hidden = 2 * (micro_batch * seq_len if mode == "original" else tokens) * h * 4
        flops_calibration = (2.0 * sum(layer_params) * tokens
                             + sum(2.0 * n * n * tokens for i in layers for _, n in widths[i]))
        flops_svd = sum(svd_flops(p.m, p.n) * (2 if p.k2 else 1) for p in mods)
        written = sum(p.params_after for p in mods) * shape.dtype_bytes
        entry = {
            "actor": k, "layers": f"{layers[0]}-{layers[-1]}", "weights_bytes": weights,
            "device_peak_bytes": max(layer_params, default=0) * shape.dtype_bytes + activations
            + 4 * widest_input * widest_input,
            "host_peak_bytes": (weights if host_weights else embedding) + hidden + svd_workspace
            + (sum(grams) if mode == "original" else max(grams, default=0)),
            "object_store_bytes": tokens * h * 4,
            "read_bytes": weights, "write_bytes": written,
        }
        if rates is not None:
            entry["calibration_s"] = flops_calibration / (rates.matmul_gflops * 1e9) + weights / (rates.read_gbps * 1e9)
            entry["decomposition_s"] = flops_svd / (rates.svd_gflops * 1e9) + written / (rates.write_gbps * 1e9)
        out.append(entry)
    return out


def check_fit(shards: list[dict], device_limit: float | None, host_limit: float | None) -> None:
    """Raise ValueError naming the first actor whose device or host peak exceeds its limit (bytes), and the fix."""
    fixes = {"device": "lower calibration.micro_batch (one layer is on the device at a time, so more workers do "
                       "not help)",
             "host": "raise runtime.workers (fewer layers per shard) or lower calibration.micro_batch / "
                     "calibration.num_sequences"}
    for s in shards:
        for key, limit, where in (("device_peak_bytes", device_limit, "device"), ("host_peak_bytes", host_limit, "host")):
            if limit is not None and s[key] > limit:
                raise ValueError(
                    f"actor {s['actor']} (layers {s['layers']}) needs {s[key] / 2**30:.1f} GiB of {where} memory, "
                    f"more than the {limit / 2**30:.1f} GiB available; {fixes[where]}"
                )
