"""What one job carries from phase to phase: the resolved source, the job's context, its stage and how its layer
shards run (shared by the job, its output and drift scoring)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from rich.progress import Progress
from torch import nn

from nesta_ray.checkpoint.stage import LayerStage, job_fingerprint
from nesta_ray.config.schema import JobConfig
from nesta_ray.data.text import fingerprint_tokens
from nesta_ray.data.windows import TextCache
from nesta_ray.io.sources import ModelSource, load_config, meta_model, open_source
from nesta_ray.model.arch import ArchSpec, arch_for
from nesta_ray.ops.gate import Case
from nesta_ray.ops.metrics import JobMetrics
from nesta_ray.pipeline.backends import BackendSpec
from nesta_ray.pipeline.faults import Fault
from nesta_ray.pipeline.ray_env import cluster_gpu_kinds
from nesta_ray.pipeline.shard_worker import ShardOptions


@dataclass
class Source:
    """The resolved source model: where it is, its transformers config, a meta-device skeleton, its architecture
    and fingerprint."""

    model: ModelSource
    hf_config: Any
    skeleton: nn.Module
    spec: ArchSpec
    fingerprint: str


@dataclass
class JobContext:
    """What every phase of one job reads and adds to: the config (its ratio fixed once chosen), the source, the
    text, the report, timings and metrics."""

    cfg: JobConfig
    source: Source
    tokenizer: Any
    texts: TextCache
    calib: torch.Tensor
    evals: dict[str, torch.Tensor]
    cases: list[Case]
    metrics: JobMetrics
    progress: Progress
    report: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def resolve_source(cfg: JobConfig) -> Source:
    """Resolve the model (a remote one's config and tokenizer copied once, its weights left where they are) and
    build its skeleton on the meta device. Raises ModelError for a missing or unsupported model."""
    model = open_source(cfg.model.source, cfg.model.cache_dir, cfg.model.storage_options)
    hf_config = load_config(model.folder)
    spec = arch_for(hf_config.model_type)
    return Source(model, hf_config, meta_model(hf_config), spec, model.fingerprint())


def decompose_devices(cfg: JobConfig) -> str:
    """Where ``runtime.decompose_precision: auto`` will be resolved, for the stage key: "cpu" for the embedded
    loop and CPU shards, else the cluster's GPU kinds (Ray's ``accelerator_type:*`` resources), so that factors
    staged in float32 on one kind of GPU are never resumed beside float64 ones; "" when the precision is fixed.
    Ray must be initialised."""
    if cfg.runtime.decompose_precision != "auto":
        return ""
    kinds = cluster_gpu_kinds() if cfg.runtime.workers else None
    return "cpu" if kinds is None else "gpu:" + ",".join(kinds)


def job_stage(ctx: JobContext) -> LayerStage:
    """This job's stage: keyed by the config, the source model, the calibration tokens, the code and where an
    automatic decomposition precision is resolved (``decompose_devices``)."""
    config = ctx.cfg.fingerprint() + decompose_devices(ctx.cfg)
    key = job_fingerprint(config, ctx.source.fingerprint, fingerprint_tokens(ctx.calib))
    return LayerStage(ctx.cfg.output.uri, key, ctx.cfg.output.storage_options)


def shard_options(cfg: JobConfig, markers: str) -> ShardOptions:
    """How this config's shards run; an injected fault (tests) counts its deaths under ``markers``."""
    rt = cfg.runtime
    fault = None if rt.fail_at_layer is None else Fault(rt.fail_phase, rt.fail_at_layer, markers, rt.fail_times,
                                                        cfg.output.storage_options)
    return ShardOptions(cfg.model.dtype, BackendSpec(rt.backend, rt.offload, rt.nvme_path), fault)
