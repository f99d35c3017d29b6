"""The compression plan: which linears, at which rank. Pure: no I/O, no Ray.

k1 is decided in one place, ``Method.split`` in the decomposition: the plan states the nested split only where
the rank alone fixes it (a global ``k1_fraction``) and says "per matrix" (``split is None``) where the whitened
spectrum decides it (``k1_tolerance``), instead of pretending to know it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from nesta_ray.config.schema import JobConfig
from nesta_ray.errors import ConfigError
from nesta_ray.method.decompose import Method
from nesta_ray.method.ranks import rank_for_ratio
from nesta_ray.model.arch import ArchSpec, arch_for
from nesta_ray.model.layers import config_of, decoder_layers, layer_linears, weight_of


@dataclass(frozen=True)
class ModulePlan:
    """One linear to compress: its full name, layer, input group, shape (out m, in n), rank, and the nested split
    (k1, k2) where the rank fixes it (None: chosen per matrix by the decomposition, 0 <= k1 <= rank)."""

    name: str
    layer: int
    group: str
    m: int
    n: int
    rank: int
    split: tuple[int, int] | None

    @property
    def params_before(self) -> int:
        return self.m * self.n

    @property
    def params_after(self) -> int:
        return self.rank * (self.m + self.n)

    @property
    def residual_svd(self) -> bool:
        """Whether the decomposition may run a second (residual) SVD: always when k1 is chosen per matrix."""
        return self.split is None or self.split[1] > 0


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

    def names(self, layer: int) -> list[str]:
        """Full names of the layer's planned linears, in plan order."""
        return [p.name for p in self.modules if p.layer == layer]

    def subset(self, layers: list[int]) -> Plan:
        """The plan restricted to ``layers`` (a layer shard's part)."""
        return Plan([p for p in self.modules if p.layer in layers], self.model_params)

    def allocated(self, ranks: dict[str, int], method: Method) -> Plan:
        """This plan with the ranks of an allocation (``method.allocation``): each linear named in ``ranks`` at
        its rank (the nested split as ``method`` plans it), every other linear left out (it stays dense). Raises
        ValueError for a name that is not planned or a rank outside [1, min(m, n)]."""
        planned = {p.name: p for p in self.modules}
        unknown = sorted(set(ranks) - set(planned))
        bad = {n: k for n, k in ranks.items() if n in planned and not 1 <= k <= min(planned[n].m, planned[n].n)}
        if unknown or bad:
            raise ValueError(f"allocation names linears that are not planned {unknown[:3]} or ranks out of range "
                             f"{dict(list(bad.items())[:3])}")
        return Plan([dataclasses.replace(p, rank=ranks[p.name], split=method.planned_split(ranks[p.name]))
                     for p in self.modules if p.name in ranks], self.model_params)

    def as_dict(self) -> dict[str, Any]:
        return {"modules": [asdict(p) for p in self.modules], "model_params": self.model_params,
                "params_before": self.params_before, "params_after": self.params_after}


def make_plan(model: nn.Module, spec: ArchSpec, *, method: Method, ratio: float, targets: list[str],
              layers: list[int] | None = None, rank_overrides: dict[str, int] | None = None) -> Plan:
    """Plan for ``model`` (real or on the meta device). Raises ValueError for an override naming no planned linear,
    a rank beyond min(out, in) or a layer index out of range."""
    overrides = dict(rank_overrides or {})
    all_layers = decoder_layers(model, spec)
    chosen = range(len(all_layers)) if layers is None else layers
    bad = [i for i in chosen if not 0 <= i < len(all_layers)]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {len(all_layers)} decoder layers")
    modules = []
    for i in chosen:
        for path, lin in layer_linears(all_layers[i], spec, targets).items():
            name = spec.layer_prefix(i) + path
            m, n = weight_of(lin).shape
            rank = overrides.pop(name, None) or rank_for_ratio(m, n, ratio)
            if rank > min(m, n):
                raise ValueError(f"rank override {rank} for {name} exceeds min(out, in) = {min(m, n)}")
            modules.append(ModulePlan(name, i, spec.group_of(path.rsplit(".", 1)[-1]), m, n, rank,
                                      method.planned_split(rank)))
    if overrides:
        raise ValueError(f"rank_overrides name linears that are not planned: {sorted(overrides)[:3]}")
    return Plan(modules, sum(p.numel() for p in model.parameters()))


def plan_for(model: nn.Module, cfg: JobConfig) -> Plan:
    """The plan of ``cfg``'s method section for ``model``; ConfigError when it names impossible ranks or layers.
    Raises ConfigError for ``ratio: auto`` (plan a tried ratio with ``cfg.with_ratio``)."""
    m = cfg.method
    if m.ratio == "auto":
        raise ConfigError("method.ratio: auto has no plan until a ratio is chosen")
    try:
        return make_plan(model, arch_for(config_of(model).model_type), method=m.as_method(), ratio=m.ratio,
                         targets=m.targets, layers=m.layers, rank_overrides=m.rank_overrides)
    except ValueError as err:
        raise ConfigError(f"method: {err}") from None
