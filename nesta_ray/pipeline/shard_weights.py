"""Which weights a layer shard computes with, and switching between them.

A lifecycle call names the weights it wants (``Weights``): the dense source, the factors of this job's stage, the
factors of a published run, or factors at a ratio the automatic search is trying. A shard switches its layers to
them on demand and keeps the dense linears, so switching back costs nothing. Every call carries its ``Weights``,
so a shard that Ray restarted mid-run (all state lost) installs them again and gives the same numbers; only a
tried ratio needs the shard's prepared SVDs, and a shard that lost them says so (``ShardStateLost``) instead of
computing anything else; the driver then has it prepare again and retries.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from nesta_ray.checkpoint.layout import factor_keys
from nesta_ray.checkpoint.runs import hash_files, verify_files, weight_index
from nesta_ray.checkpoint.stage import LayerStage
from nesta_ray.errors import ShardStateLost
from nesta_ray.io.weights import WeightStore
from nesta_ray.method.allocation import loss_curve, output_directions
from nesta_ray.method.decompose import Factors, InputStats, Method, Scaled, decompose, on_solver, scale
from nesta_ray.method.drift import relative_error
from nesta_ray.method.factorize import Solver
from nesta_ray.model.sensitivity import ComponentFisher
from nesta_ray.pipeline.layer_host import LayerHost
from nesta_ray.pipeline.tasks import fixed_threads
from nesta_ray.plan.linears import Plan


@dataclass(frozen=True)
class Weights:
    """What a shard's layers compute with: ``kind`` "dense", "stage" (the staged factors of ``stage``), "run"
    (the factors of the published run at ``uri``, read with ``storage_options``) or "ratio" (factors at
    ``ranks``, linear name -> rank, from the shard's prepared SVDs)."""

    kind: str = "dense"
    stage: LayerStage | None = None
    uri: str = ""
    storage_options: dict | None = None
    ranks: tuple[tuple[str, int], ...] = ()


DENSE = Weights()


def staged(stage: LayerStage) -> Weights:
    """The weights of a job's stage."""
    return Weights("stage", stage=stage)


def published(run_uri: str, storage_options: dict | None = None) -> Weights:
    """The weights of a published run."""
    return Weights("run", uri=run_uri, storage_options=storage_options)


def at_ranks(ranks: dict[str, int]) -> Weights:
    """The weights of a tried ratio or a rank allocation: factors at these ranks (linear name -> rank); a planned
    linear these ranks do not name stays dense (an allocation keeps it)."""
    return Weights("ratio", ranks=tuple(sorted(ranks.items())))


class WeightsSwitch:
    """A shard's layers switched between weights; ``backend`` holds the layers, ``plan`` its part of the plan;
    factorisations and truncations run with ``threads`` torch threads (the decomposition tasks' count) where and
    as ``solver`` says (default: the CPU in float64); the prepared factorisations are kept on the host."""

    def __init__(self, backend: LayerHost, plan: Plan, method: Method, threads: int,
                 solver: Solver | None = None) -> None:
        self.backend, self.plan, self.method, self.threads = backend, plan, method, threads
        self.solver = solver or Solver()
        self.current = DENSE
        self.prepared: dict[str, tuple[Scaled, InputStats]] = {}  # linear -> its scaled SVD and statistics

    def ensure(self, weights: Weights) -> None:
        """Make the shard's planned layers compute with ``weights`` (no work when they already do). Raises
        PipelineError for a tried ratio after the shard lost its prepared SVDs (a restart)."""
        if weights == self.current:
            return
        layers = self.plan.layers()
        for i in layers:
            self.backend.restore(i)
        self.current = DENSE
        if weights.kind == "stage":
            assert weights.stage is not None
            for i in layers:
                self.backend.install(i, weights.stage.get(i))
        elif weights.kind == "run":
            for i, factors in self.run_factors(weights).items():
                self.backend.install(i, factors)
        elif weights.kind == "ratio":
            for i, factors in self.at_ratio(dict(weights.ranks)).items():
                self.backend.install(i, factors)
        self.current = weights

    def adopt(self, weights: Weights) -> None:
        """Declare that the layers already compute with ``weights`` (the caller installed them)."""
        self.current = weights

    def run_factors(self, weights: Weights) -> dict[int, dict[str, Factors]]:
        """Per layer, the factors of this shard's linears in the run at ``weights.uri``, read tensor by tensor
        (only their bytes; A and B only, their statistics stay in the run's nesta.json)."""
        manifest = verify_files(weights.uri, [], weights.storage_options)  # the index names only listed files
        store = WeightStore(weights.uri, weights.storage_options, weight_index(weights.uri, weights.storage_options))
        wanted = {i: [k for name in self.plan.names(i) for k in factor_keys(name)] for i in self.plan.layers()}
        hash_files(weights.uri, manifest, sorted({store.entries[k].file for keys in wanted.values() for k in keys}),
                   weights.storage_options)  # every file read from a run is one its manifest vouches for
        out: dict[int, dict[str, Factors]] = {}
        for i, keys in wanted.items():
            names = self.plan.names(i)
            read = store.read(keys)
            out[i] = {}
            for name in names:
                a, b = factor_keys(name)
                out[i][name] = Factors(read[a], read[b], k1=read[a].shape[1], k2=0, loss=0.0, relative_loss=0.0)
        return out

    def errors(self, i: int, stats: dict[str, InputStats], published: dict[str, Factors]) -> dict[str, float]:
        """Relative output error tr(Δ·G·Δᵀ)/tr(W·G·Wᵀ) of layer ``i``'s planned linears (dense W) for the
        ``published`` factors under the Grams ``stats`` (per input group)."""
        out: dict[str, float] = {}
        for group, plans in self.plan.for_layer(i).items():
            gram = stats[group].gram
            assert gram is not None
            for name, W in self.backend.weights(i, plans).items():
                out[name] = relative_error(torch.from_numpy(W), published[name].A, published[name].B, gram)
        return out

    def prepare(self, stats: dict[int, dict[str, InputStats]]) -> None:
        """One scaled SVD per planned linear (the group's scaling shared), from this shard's statistics."""
        self.prepared.clear()
        with fixed_threads(self.threads):
            self._prepare(stats)

    def _prepare(self, stats: dict[int, dict[str, InputStats]]) -> None:
        for i in self.plan.layers():
            for group, plans in self.plan.for_layer(i).items():
                wh = self.method.scaling(on_solver(stats[i][group], self.solver), self.solver.torch_dtype)
                weights = self.backend.weights(i, plans)
                for p in plans:
                    W = torch.tensor(weights[p.name])  # (m, n)
                    scaled = scale(W, self.method, whitening=wh, solver=self.solver).to("cpu")
                    self.prepared[p.name] = (scaled, stats[i][group])

    def _require_prepared(self) -> None:
        if not self.prepared:
            raise ShardStateLost("a layer shard lost its prepared SVDs (it was restarted during the automatic ratio "
                                 "search or the rank allocation); rerun the job")

    def fishers(self, device: torch.device | str) -> dict[str, ComponentFisher]:
        """Per planned linear, an accumulator of its loss gradients' projections onto the left singular vectors
        of its prepared scaled SVD (kept on ``device``, where the gradients arrive). Raises ShardStateLost when
        the SVDs are missing (a restart after ``prepare``)."""
        self._require_prepared()
        out: dict[str, ComponentFisher] = {}
        for i in self.plan.layers():
            plans = [p for group in self.plan.for_layer(i).values() for p in group]
            for name, W in self.backend.weights(i, plans).items():
                scaled = self.prepared[name][0]
                U, s, Vh = scaled.usv
                X = torch.from_numpy(W).to(s.dtype)
                X = scaled.whitening.apply(X) if scaled.whitening is not None and U is None else X
                out[name] = ComponentFisher(output_directions(U, s, Vh, X), device)
        return out

    def curves(self, fishers: dict[str, ComponentFisher]) -> dict[str, np.ndarray]:
        """Per planned linear, its sensitivity curve D (r + 1,) (``allocation.loss_curve``) from its prepared
        spectrum and the projections ``fishers`` accumulated."""
        self._require_prepared()
        return {name: loss_curve(self.prepared[name][0].usv[1], f.sums).numpy() for name, f in fishers.items()}

    def linears(self, i: int) -> dict[str, nn.Module]:
        """Layer ``i``'s planned linears as its layer holds them now (full name -> module)."""
        return {name: self.backend.module(i, name) for name in self.plan.names(i)}

    def at_ratio(self, ranks: dict[str, int]) -> dict[int, dict[str, Factors]]:
        """Per layer, the factors of the planned linears named in ``ranks`` at their ranks from the prepared SVDs
        (the others stay dense). Raises ShardStateLost when they are missing (a restart after ``prepare``)."""
        self._require_prepared()
        with fixed_threads(self.threads):
            return self._at_ratio(ranks)

    def _at_ratio(self, ranks: dict[str, int]) -> dict[int, dict[str, Factors]]:
        out: dict[int, dict[str, Factors]] = {}
        for i in self.plan.layers():
            plans = [p for group in self.plan.for_layer(i).values() for p in group if p.name in ranks]
            weights = self.backend.weights(i, plans)
            out[i] = {}
            for p in plans:
                scaled, stats = self.prepared[p.name]
                start = time.perf_counter()
                f = decompose(torch.tensor(weights[p.name]), self.method, ranks[p.name], stats, scaled=scaled,
                              solver=self.solver)
                out[i][p.name] = dataclasses.replace(f, seconds=time.perf_counter() - start)
        return out
