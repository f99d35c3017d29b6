"""The plan as text (``--dry-run``): linears by projection with ranks and parameter counts, totals, memory, and
with ``runtime.workers`` the layer-shard actors with their memory peaks, bytes and time estimates."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from nesta_ray.config.schema import JobConfig
from nesta_ray.errors import ConfigError
from nesta_ray.plan.linears import ModulePlan, Plan, plan_for
from nesta_ray.plan.sizing import ModelShape, dtype_bytes, memory_estimate, shard_plan
from nesta_ray.plan.timing import Rates, job_seconds, measure_rates, shard_time
from nesta_ray.report.markdown import table


def hf_config_of(cfg: JobConfig) -> Any:
    """The source's transformers config: from ``model.config_json`` when given (no access to the source), else
    from the resolved source. Raises ConfigError for an unreadable config_json, ModelError for the source."""
    from transformers import AutoConfig

    if cfg.model.config_json:
        try:
            raw = json.loads(Path(cfg.model.config_json).read_text())
            return AutoConfig.for_model(raw.pop("model_type"), **raw)
        except (OSError, KeyError, ValueError) as err:
            raise ConfigError(f"model.config_json: cannot read a config.json with model_type from "
                              f"{cfg.model.config_json} ({type(err).__name__}: {err})") from None
    from nesta_ray.io.sources import resolve_model

    return AutoConfig.from_pretrained(resolve_model(cfg.model.source, cfg.model.cache_dir, cfg.model.storage_options))


def _split(p: ModulePlan, cfg: JobConfig) -> str:
    if p.split is None:
        return f"per matrix (tolerance {cfg.method.k1_tolerance:g})"
    return f"{p.split[0]}+{p.split[1]}"


def _linear_table(plan: Plan, cfg: JobConfig) -> str:
    by_proj: dict[tuple[Any, ...], list[ModulePlan]] = defaultdict(list)
    for p in plan.modules:
        by_proj[(p.name.rsplit(".", 1)[-1], p.m, p.n, p.rank, _split(p, cfg))].append(p)
    rows = [[proj, len(ps), f"{m}x{n}", rank, split, f"{m * n * len(ps):,}", f"{rank * (m + n) * len(ps):,}"]
            for (proj, m, n, rank, split), ps in by_proj.items()]
    return table(["linear", "count", "shape (out x in)", "rank", "k1+k2", "params before", "params after"], rows)


def _shard_lines(cfg: JobConfig, plan: Plan, hf_config: Any) -> list[str]:
    rates_src = "runtime.rates" if cfg.runtime.rates else "measured on this machine (1 process)"
    rates = Rates(**cfg.runtime.rates.model_dump()) if cfg.runtime.rates else measure_rates()
    shards = shard_plan(cfg, plan, hf_config)
    times = [shard_time(s, rates) for s in shards]
    gib = lambda b: f"{b / 2**30:,.1f}"  # noqa: E731
    rows = [[s.actor, s.label, gib(s.weights_bytes), gib(s.device_peak_bytes), gib(s.host_peak_bytes),
             gib(s.read_bytes), gib(s.write_bytes), f"{t.calibration_s / 3600:.2f}", f"{t.decomposition_s / 3600:.2f}"]
            for s, t in zip(shards, times)]
    cal = cfg.calibration
    total, how = job_seconds(times, cal.mode, -(-cal.num_sequences // cal.micro_batch))
    return [
        table(["actor", "layers", "weights GiB", "device peak GiB", "host peak GiB", "read GiB", "write GiB",
               "calibration h", "decomposition h"], rows),
        f"time estimate: {total / 3600:.2f} h ({how}; rates {rates_src}: matmul {rates.matmul_gflops:,.0f} GFLOP/s, "
        f"SVD {rates.svd_gflops:,.1f} GFLOP/s, read {rates.read_gbps} GB/s, write {rates.write_gbps} GB/s)",
        f"fits: every actor within {cfg.runtime.device_memory_gb} GiB device / {cfg.runtime.host_memory_gb} GiB "
        "host memory",
    ]


def dry_run(cfg: JobConfig) -> str:
    """The plan of ``cfg`` as text (no weights read: the model is built on the meta device). Raises ConfigError
    when the job cannot be planned or does not fit."""
    from transformers import AutoModelForCausalLM

    auto = cfg.method.auto
    if auto:  # the search picks the ratio at run time; plan (and size) its largest ranks
        cfg = cfg.with_ratio(auto.min_ratio)
    hf_config = hf_config_of(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    plan = plan_for(model, cfg)
    lines = [
        f"model {cfg.model.source} ({hf_config.model_type}, {plan.model_params:,} parameters), method "
        f"{cfg.method.name}, ratio {cfg.method.ratio}" + (f" (auto: the largest of {auto.grid()} keeping {auto.set} "
                                                          f"within +{auto.max_increase:.0%}; planned at the smallest)"
                                                          if auto else "")
        + f", {len(plan.modules)} linears in {len(plan.layers())} layers",
        _linear_table(plan, cfg),
        f"compressed linears: {plan.params_before:,} -> {plan.params_after:,} parameters "
        f"({1 - plan.params_after / plan.params_before:.1%} removed); whole model: {plan.model_params:,} -> "
        f"{plan.model_params - plan.params_before + plan.params_after:,}",
    ]
    if cfg.runtime.workers:
        lines += _shard_lines(cfg, plan, hf_config)
    else:
        mem = memory_estimate(plan, ModelShape.of(hf_config, dtype_bytes(cfg.model.dtype)), cfg.calibration)
        lines.append(table(["memory", "GiB"], [[k, f"{v / 2**30:.3f}"] for k, v in mem.items()]))
    lines.append(f"output: {cfg.output.uri}/runs/<run id> (then latest)")
    return "\n\n".join(lines)
