"""One interface over the model for every lifecycle step, with two implementations: the whole model in this
process (the embedded default) and the layer-shard actors (``ShardGroup``, for models no single machine holds).

Both compute per-window NLL and greedy next tokens under named ``Weights`` (dense, staged, published or a tried
ratio), prepare and stage the automatic ratio's factors, measure each linear's sensitivity for the rank
allocation and score drift with the same maths, so the numbers of a sharded run equal the in-process ones on the
same model.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from nesta_ray.checkpoint.stage import LayerStage
from nesta_ray.model.arch import arch_for
from nesta_ray.model.calibration import collect_statistics
from nesta_ray.model.layers import config_of
from nesta_ray.model.sensitivity import collect_projections
from nesta_ray.ops.evaluation import window_nll
from nesta_ray.pipeline.layer_host import ModelLayers
from nesta_ray.pipeline.precision import device_solver
from nesta_ray.pipeline.shard_weights import DENSE, Weights, WeightsSwitch, staged
from nesta_ray.pipeline.tasks import Work, fixed_threads, usable_cpus


class Runner(Protocol):
    """What every lifecycle step asks of a model, wherever its layers live."""

    def window_nll(self, windows: torch.Tensor, weights: Weights, batch_size: int = 1) -> torch.Tensor:
        """Summed next-token NLL of each window (W,) for token windows (W, L)."""
        ...

    def next_token(self, seq: torch.Tensor, weights: Weights) -> int:
        """The arg-max next token after ``seq`` (1, t)."""
        ...

    def prepare(self, ids: torch.Tensor) -> None:
        """One scaled SVD per planned linear from the dense statistics of calibration windows ``ids``."""
        ...

    def stage_ratio(self, weights: Weights) -> list[int]:
        """Stage the factors at a tried ratio's ranks (``weights`` of kind "ratio"); returns the layers staged."""
        ...

    def sensitivity(self, ids: torch.Tensor) -> dict[str, np.ndarray]:
        """After ``prepare``: each planned linear's sensitivity curve D (r + 1,) (``method.allocation``) from one
        backward pass of the summed next-token NLL of windows ``ids`` (N, L) through the dense model."""
        ...

    def drift_errors(self, ids: torch.Tensor, weights: Weights) -> dict[str, float]:
        """Each planned linear's relative output error under the dense Grams of ``ids`` for factors ``weights``."""
        ...


class InProcessModel(AbstractContextManager["InProcessModel"]):
    """The whole ``model`` in this process doing ``work`` (its plan names the linears), staging into ``stage``."""

    def __init__(self, model: nn.Module, work: Work, stage: LayerStage | None = None) -> None:
        self.model, self.work, self.stage = model, work, stage
        self.spec = arch_for(config_of(model).model_type)
        self.host = ModelLayers(model, self.spec)
        solver = device_solver(torch.device("cpu"), work)[0]
        self.switch = WeightsSwitch(self.host, work.plan, work.method, work.threads, solver)

    def __exit__(self, *exc: object) -> None:
        return None

    def window_nll(self, windows: torch.Tensor, weights: Weights, batch_size: int = 1) -> torch.Tensor:
        self.switch.ensure(weights)
        return window_nll(self.model, windows, batch_size)

    @torch.no_grad()
    def next_token(self, seq: torch.Tensor, weights: Weights) -> int:
        self.switch.ensure(weights)
        return int(self.model(input_ids=seq, use_cache=False).logits[0, -1].argmax())

    def keep_dense(self) -> None:
        """Remember the planned linears' dense modules before something installs factors outside the switch
        (the embedded compression loop), so that the dense weights stay reachable."""
        for i in self.work.plan.layers():
            layer = self.host.layer(i)
            kept = self.host.dense.setdefault(i, {})
            for name in self.work.plan.names(i):
                path = name.removeprefix(self.spec.layer_prefix(i))
                kept.setdefault(path, layer.get_submodule(path))

    def adopt_stage(self) -> None:
        """The embedded loop installed the stage's factors: the model now computes with them."""
        assert self.stage is not None
        self.switch.adopt(staged(self.stage))

    def _dense_statistics(self, ids: torch.Tensor) -> dict[int, Any]:
        self.switch.ensure(DENSE)
        return collect_statistics(self.model, self.spec, self.work.plan.layers(), ids, self.work.micro_batch,
                                  self.work.calibration_precision)

    def prepare(self, ids: torch.Tensor) -> None:
        self.switch.prepare(self._dense_statistics(ids))

    def stage_ratio(self, weights: Weights) -> list[int]:
        assert self.stage is not None
        todo = sorted(set(self.work.plan.layers()) - self.stage.done())
        factors = self.switch.at_ratio(dict(weights.ranks))
        for i in todo:
            self.stage.put(i, factors[i])
        return todo

    def sensitivity(self, ids: torch.Tensor) -> dict[str, np.ndarray]:
        self.switch.ensure(DENSE)
        fishers = self.switch.fishers("cpu")
        linears = {i: self.switch.linears(i) for i in self.work.plan.layers()}
        workers = max(1, usable_cpus() // self.work.threads)  # micro-batches side by side
        with fixed_threads(self.work.threads):  # the shards' count: the same sums bit for bit
            collect_projections(self.model, self.spec, ids, self.work.micro_batch, linears, fishers, workers)
        return self.switch.curves(fishers)

    def drift_errors(self, ids: torch.Tensor, weights: Weights) -> dict[str, float]:
        stats = self._dense_statistics(ids)
        published = self.switch.run_factors(weights)
        return {name: e for i in self.work.plan.layers()
                for name, e in self.switch.errors(i, stats[i], published[i]).items()}
