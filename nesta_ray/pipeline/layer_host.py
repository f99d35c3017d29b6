"""Decoder layers whose linears can be switched between their dense weights and factors, wherever they live:
the common part of a layer shard's backend, and the same verbs over a whole model held in this process, so that
one ``WeightsSwitch`` drives both."""

from __future__ import annotations

import numpy as np
from torch import nn

from nesta_ray.method.decompose import Factors
from nesta_ray.model.arch import ArchSpec
from nesta_ray.model.layers import decoder_layers, set_submodule, weight_of
from nesta_ray.model.lowrank import install_factors
from nesta_ray.plan.linears import ModulePlan


class LayerHost:
    """Layers by index (``layer``), an architecture map (``spec``) and where installed factors live
    (``factor_device``, None: beside the linear they replace). Installing keeps the dense linears, so that
    ``restore`` puts them back and ``weights`` still reads them."""

    spec: ArchSpec
    factor_device: object = None

    def __init__(self) -> None:
        self.dense: dict[int, dict[str, nn.Module]] = {}  # layer -> local path -> its dense linear, while replaced

    def layer(self, i: int) -> nn.Module:
        raise NotImplementedError

    def _local(self, i: int, name: str) -> str:
        return name.removeprefix(self.spec.layer_prefix(i))

    def install(self, i: int, factors: dict[str, Factors]) -> None:
        """Replace layer ``i``'s linears named in ``factors`` (full names) by LowRankLinears of their factors; the
        dense linears are kept for ``restore`` (a linear already replaced keeps its first dense one)."""
        layer, kept = self.layer(i), self.dense.setdefault(i, {})
        for name in factors:
            path = self._local(i, name)
            kept.setdefault(path, layer.get_submodule(path))
        install_factors(layer, factors, prefix=self.spec.layer_prefix(i), device=self.factor_device)  # type: ignore[arg-type]

    def restore(self, i: int) -> None:
        """Put layer ``i``'s dense linears back (after ``install``)."""
        layer = self.layer(i)
        for path, module in self.dense.pop(i, {}).items():
            set_submodule(layer, path, module)

    def module(self, i: int, name: str) -> nn.Module:
        """Linear ``name`` (full name) of layer ``i`` as the layer holds it now."""
        return self.layer(i).get_submodule(self._local(i, name))

    def _dense_linear(self, i: int, name: str) -> nn.Module:
        """Linear ``name`` of layer ``i`` with its dense weight, even while factors replace it."""
        path = self._local(i, name)
        kept = self.dense.get(i, {}).get(path)
        return kept if kept is not None else self.layer(i).get_submodule(path)

    def weights(self, i: int, plans: list[ModulePlan]) -> dict[str, np.ndarray]:
        """float32 dense weights (out, in) of the planned linears of layer ``i``, on the host."""
        return {p.name: weight_of(self._dense_linear(i, p.name)).detach().float().cpu().numpy() for p in plans}


class ModelLayers(LayerHost):
    """The decoder layers of a whole model held in this process."""

    def __init__(self, model: nn.Module, spec: ArchSpec) -> None:
        super().__init__()
        self.model, self.spec = model, spec
        self.layers = decoder_layers(model, spec)

    def layer(self, i: int) -> nn.Module:
        return self.layers[i]
