"""The plan as text (``--dry-run``): linears by projection with ranks and parameter counts, totals, memory, and
with ``runtime.workers`` the layer-shard actors with their memory peaks, bytes and time estimates."""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from nesta_ray.config.schema import JobConfig
from nesta_ray.errors import ConfigError
from nesta_ray.io.sources import meta_model
from nesta_ray.ops.gate import read_cases
from nesta_ray.pipeline.preflight import preflight
from nesta_ray.plan.linears import ModulePlan, Plan, plan_for
from nesta_ray.plan.rates import Rates, read_rates
from nesta_ray.plan.sizing import ModelShape, dtype_bytes, memory_estimate, shard_plan, shard_ranges
from nesta_ray.plan.timing import Phase, drift_phase, job_floor, job_phases, job_seconds, measure_rates, shard_time
from nesta_ray.report.markdown import table


def hf_config_of(cfg: JobConfig) -> Any:
    """The source's transformers config: from ``model.config_json`` when given (no access to the source), else
    from the resolved source. Raises ConfigError for an unreadable config_json, ModelError for the source."""
    from transformers import AutoConfig

    if cfg.model.config_json:
        try:
            raw = json.loads(Path(cfg.model.config_json).read_text())
            return AutoConfig.for_model(raw.pop("model_type"), **raw)
        except (OSError, KeyError, ValueError, TypeError, AttributeError) as err:
            raise ConfigError(f"model.config_json: cannot read a config.json with model_type from "
                              f"{cfg.model.config_json} ({type(err).__name__}: {err})") from None
    from nesta_ray.io.sources import load_config, open_source

    return load_config(open_source(cfg.model.source, cfg.model.cache_dir, cfg.model.storage_options).folder)


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


def _rates(cfg: JobConfig) -> tuple[Rates, str]:
    """The rates of ``runtime.rates`` (a rates file, or inline) or measured here, and where they come from."""
    given = cfg.runtime.rates
    rates = (read_rates(given) if isinstance(given, str) else Rates(**given.model_dump(), label="runtime.rates")
             if given else measure_rates())
    return rates, rates.label


def _shard_lines(cfg: JobConfig, plan: Plan, hf_config: Any, rates: Rates) -> list[str]:
    shards = shard_plan(cfg, plan, hf_config)
    times = [shard_time(s, rates) for s in shards]
    gib = lambda b: f"{b / 2**30:,.1f}"  # noqa: E731
    rows = [[s.actor, s.label, gib(s.weights_bytes), gib(s.device_peak_bytes), gib(s.host_peak_bytes),
             gib(s.read_bytes), gib(s.write_bytes), f"{t.calibration_s / 3600:.2f}", f"{t.decomposition_s / 3600:.2f}"]
            for s, t in zip(shards, times)]
    cal = cfg.calibration
    total, how = job_seconds(times, cal.mode, -(-cal.num_sequences // cal.micro_batch))
    return [
        table(["actor", "layers", "weights GiB", "device peak GiB", "host peak GiB", "read GiB", "stage write GiB",
               "calibration h", "decomposition h"], rows),
        f"time estimate: {total / 3600:.2f} h ({how}; rates {rates.describe()}; GFLOP/s, GB/s)",
        f"fits: every actor within {cfg.runtime.device_memory_gb} GiB device / {cfg.runtime.host_memory_gb} GiB "
        "host memory",
    ]


def anchored_cost(plan: Plan, cfg: JobConfig, hidden: int) -> str:
    """What the anchored fit (``method.anchored``) adds to a propagate-mode job, as one line: the dense stream of
    hidden states beside the compressed one, its extra pass per layer and the two more n×n sums per input group."""
    widths = {(p.layer, p.group): p.n for p in plan.modules}
    per_layer = max((sum(8 * 2 * n * n for (i, _), n in widths.items() if i == layer) for layer in plan.layers()),
                    default=0)
    stream = cfg.calibration.num_sequences * cfg.calibration.seq_len * hidden * 4
    return (f"anchored fit ({cfg.method.anchor}): a second, dense stream of hidden states (+{stream / 2**30:.3f} GiB "
            "held, fp32), one more forward of every window through each dense layer (3 passes per layer instead of "
            "propagate's 2), and per input group the cross-Gram XᵀX̂ and the dense Gram XᵀX beside X̂ᵀX̂ "
            f"(+{per_layer / 2**20:,.1f} MiB fp64 for the widest layer); on the layer shards the micro-batches "
            "travel as (2, b, t, d), twice the bytes")


def allocation_cost(plan: Plan, cfg: JobConfig, workers: int) -> str:
    """What ``allocation: sensitivity`` adds, as one line: the prepared SVDs kept until the ranks are chosen
    (the short side's singular vectors and σ in fp64 on the host) and, during the backward pass, each linear's
    left singular vectors U (m, min(m, n)) in fp32 where the gradients arrive; both for the largest shard (the
    whole model when embedded)."""
    chunks = shard_ranges(max(plan.layers(), default=0) + 1, workers) if workers else [plan.layers()]
    svd = max(sum(8 * min(p.m, p.n) * (min(p.m, p.n) + 1) for p in plan.modules if p.layer in c) for c in chunks)
    u = max(sum(4 * p.m * min(p.m, p.n) for p in plan.modules if p.layer in c) for c in chunks)
    where = f"the largest of {workers} shards" if workers else "the model"
    return (f"rank allocation (sensitivity): the ranks above are the uniform plan's; the job re-spends its "
            f"{plan.params_after:,} parameters after one dense calibration pass, one scaled SVD per linear (kept: "
            f"{svd / 2**30:,.2f} GiB fp64 host for {where}) and one forward + backward of the first "
            f"{cfg.method.sensitivity_windows} windows (U of every linear: {u / 2**30:,.2f} GiB fp32 on the device; "
            "on the shards the gradients travel back shard to shard, (b, t, d) per micro-batch)")


def phases_table(phases: list[Phase]) -> str:
    """The phases with their estimated hours and bytes, and the total."""
    gib = lambda b: f"{b / 2**30:,.1f}"  # noqa: E731
    rows = [[p.name, f"{p.seconds / 3600:.3f}", gib(p.read_bytes), gib(p.written_bytes), p.how] for p in phases]
    rows.append(["total", f"{sum(p.seconds for p in phases) / 3600:.3f}", gib(sum(p.read_bytes for p in phases)),
                 gib(sum(p.written_bytes for p in phases)), ""])
    return table(["phase", "hours", "read GiB", "written GiB", "how"], rows)


def _cases(cfg: JobConfig) -> int:
    return len(read_cases(cfg.gate.cases, cfg.gate.storage_options)) if cfg.gate and cfg.gate.cases else 0


def planned(cfg: JobConfig) -> tuple[Any, Plan]:
    """The source's config and the job's plan (at the smallest ratio an automatic search may choose)."""
    hf_config = hf_config_of(cfg)
    sized = cfg.with_ratio(cfg.method.auto.min_ratio) if cfg.method.auto else cfg
    return hf_config, plan_for(meta_model(hf_config), sized)


def job_phase_list(cfg: JobConfig, plan: Plan, hf_config: Any, rates: Rates) -> list[Phase]:
    """Every phase of this sharded job (``plan.timing.job_phases``)."""
    shards = shard_plan(cfg, plan, hf_config)
    return job_phases(cfg, shards, hf_config.vocab_size * hf_config.hidden_size, rates, _cases(cfg))


def floor_lines(cfg: JobConfig, plan: Plan, hf_config: Any, rates: Rates, estimate_s: float) -> str:
    """The job's physical floor (``plan.timing.job_floor``) as a table, and the estimate's ratio to it."""
    floor = job_floor(cfg, shard_plan(cfg, plan, hf_config), hf_config.vocab_size * hf_config.hidden_size, rates)
    total = sum(p.seconds for p in floor)
    rows = [[p.name, f"{p.seconds:,.1f}"] for p in floor] + [["floor", f"{total:,.1f}"]]
    return (table(["physical floor (peak rates, work spread over the shards)", "seconds"], rows) + "\n\n"
            + f"estimate {estimate_s / 60:,.1f} min ({estimate_s:,.0f} s) against a floor of {total:,.1f} s: "
            f"{estimate_s / total:.1f}x the floor")


def dry_run(cfg: JobConfig) -> str:
    """The plan of ``cfg`` as text (no weights read: the model is built on the meta device): linears, totals,
    memory, and with ``runtime.workers`` the shards and every phase's time and bytes. Raises ConfigError when the
    job cannot be planned or does not fit."""
    hf_config, plan = planned(cfg)
    checks = preflight(cfg, hf_config, plan, dry=True)  # what the job reads, opened; what it writes, probed
    auto = cfg.method.auto
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
    if cfg.method.anchored:
        lines.append(anchored_cost(plan, cfg, hf_config.hidden_size))
    if cfg.method.allocation == "sensitivity":
        lines.append(allocation_cost(plan, cfg, cfg.runtime.workers))
    if cfg.runtime.workers:
        rates, _ = _rates(cfg)
        lines += _shard_lines(cfg, plan, hf_config, rates)
        phases = job_phase_list(cfg, plan, hf_config, rates)
        lines += [phases_table(phases), floor_lines(cfg, plan, hf_config, rates, sum(p.seconds for p in phases))]
    else:
        shape = ModelShape.of(hf_config, dtype_bytes(cfg.model.dtype), plan.model_params)
        mem = memory_estimate(plan, shape, cfg.calibration)
        lines.append(table(["memory", "GiB"], [[k, f"{v / 2**30:.3f}"] for k, v in mem.items()]))
    lines.append(f"output: {cfg.output.uri}/runs/<run id> (then latest)")
    return "\n\n".join([*lines, checks.text()])


def night_dry_run(cfg: JobConfig) -> str:
    """A night of ``cfg`` as text: drift scoring on the shards, then (on a recompress night) the job's phases and
    the new run's held-out baseline. Raises ConfigError as ``dry_run``."""
    if not cfg.runtime.workers:
        return "a night on the whole model in this process: score drift, then maybe run the job\n\n" + dry_run(cfg)
    hf_config, plan = planned(cfg)
    checks = preflight(cfg, hf_config, plan, dry=True)
    rates, rates_src = _rates(cfg)
    shards = shard_plan(cfg, plan, hf_config)
    error_flops = sum(2.0 * p.m * p.n * p.n + 2.0 * p.rank * p.n * (p.n + p.m) for p in plan.modules)
    drift = drift_phase(cfg, shards, error_flops, rates)
    skip = [drift]
    recompress = [drift, *job_phase_list(cfg, plan, hf_config, rates),
                  dataclasses.replace(drift, name="held-out baseline of the new run")]
    return "\n\n".join([
        f"night of {cfg.model.source} on {cfg.runtime.workers} layer shards (rates {rates_src}); drift threshold "
        f"{cfg.nightly.drift_threshold}, {cfg.nightly.sample_sequences} sample windows, keep "
        f"{cfg.nightly.keep_runs} runs",
        "a night that skips:", phases_table(skip), "a night that recompresses:", phases_table(recompress),
        checks.text()])
