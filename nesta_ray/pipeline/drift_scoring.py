"""Scoring a published run's drift: each of its linears' relative output error under the dense Grams of given
windows, computed where the layers live (layer shards score their own layers; the driver only combines the
per-linear errors into per-layer scores with ``method.drift``)."""

from __future__ import annotations

import torch
from torch import nn

from nesta_ray.checkpoint.meta import RunMeta
from nesta_ray.checkpoint.reader import read_meta
from nesta_ray.config.schema import JobConfig
from nesta_ray.io.sources import load_source
from nesta_ray.io.storage import join
from nesta_ray.pipeline.context import Source, shard_options
from nesta_ray.pipeline.runner import InProcessModel
from nesta_ray.pipeline.shard_group import ShardGroup
from nesta_ray.pipeline.shard_weights import published
from nesta_ray.pipeline.tasks import Work
from nesta_ray.plan.linears import ModulePlan, Plan


def run_plan(source: Source, meta: RunMeta) -> Plan:
    """The linears a published run compressed, as a plan over the source model (ranks as the run stores them)."""
    spec = source.spec
    modules = [ModulePlan(name, spec.layer_of(name), spec.group_of(name.rsplit(".", 1)[1]), r.shape[0], r.shape[1],
                          r.rank, (r.k1, r.k2)) for name, r in meta.modules.items()]
    return Plan(sorted(modules, key=lambda p: p.layer), sum(p.numel() for p in source.skeleton.parameters()))


class DriftScorer:
    """Scores runs against the dense source of ``cfg``: on ``runtime.workers`` layer shards (one group per
    scoring, each shard reading its own layers), or on the whole model in this process (loaded once)."""

    def __init__(self, cfg: JobConfig, source: Source) -> None:
        self.cfg, self.source = cfg, source
        self._model: nn.Module | None = None

    def errors(self, run_uri: str, ids: torch.Tensor) -> tuple[dict[str, float], dict[str, int]]:
        """Relative output error of every compressed linear of the run at ``run_uri`` under the Grams of token
        windows ``ids`` (n, L) through the dense source, and each linear's layer."""
        cfg, opts = self.cfg, self.cfg.output.storage_options
        meta = read_meta(run_uri, opts)
        plan = run_plan(self.source, meta)
        work = Work(plan, meta.method, cfg.calibration.micro_batch, "original", cfg.runtime.threads_per_task,
                    cfg.calibration.precision)
        weights = published(run_uri, opts)
        if cfg.runtime.workers:
            markers = join(cfg.output.uri, "staging", "drift-faults")
            with ShardGroup(self.source.model, work, None, cfg.runtime.workers,
                            shard_options(cfg, markers)) as shards:
                errors = shards.drift_errors(ids, weights)
        else:
            if self._model is None:
                self._model = load_source(self.source.model, getattr(torch, cfg.model.dtype))[0]
            errors = InProcessModel(self._model, work).drift_errors(ids, weights)
        return errors, {p.name: p.layer for p in plan.modules}
