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
