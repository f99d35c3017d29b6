"""The job: plan, calibrate + decompose, evaluate, gate, write, commit, on one ``Runner`` for every step.

Order of work: resolve the model and run the pre-flight check (``preflight``: what the job reads opened, the output
probed, the config checked against the model; before any compute), plan on the meta device, refuse a job that
cannot fit, read text, open the runner (the whole model in this process, or layer-shard actors that hold the
weights for every later step: no second load), evaluate dense, choose the ratio (``ratio: auto``) or the ranks
(``allocation: sensitivity``), calibrate + decompose (staging each finished layer), evaluate compressed, generate,
gate, assemble the checkpoint from the source and the stage, commit, publish. This module only orchestrates.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import torch
from rich.progress import Progress

from nesta_ray.checkpoint.stage import LayerStage
from nesta_ray.config.schema import JobConfig
from nesta_ray.data.windows import TextCache, calibration_ids, evaluation_ids
from nesta_ray.io.sources import load_source, load_tokenizer
from nesta_ray.io.storage import join
from nesta_ray.ops.evaluation import generate, perplexity_of
from nesta_ray.ops.gate import check_gate, read_cases, run_cases
from nesta_ray.ops.metrics import JobMetrics
from nesta_ray.pipeline.autoratio import choose_ratio
from nesta_ray.pipeline.context import JobContext, Source, job_stage, resolve_source, shard_options
from nesta_ray.pipeline.embedded import compress_layerwise
from nesta_ray.pipeline.job_output import write_run
from nesta_ray.pipeline.preflight import preflight
from nesta_ray.pipeline.progress import progress_bars
from nesta_ray.pipeline.rank_allocation import allocate_for, allocation_summary
from nesta_ray.pipeline.ray_env import ensure_ray
from nesta_ray.pipeline.runner import InProcessModel, Runner
from nesta_ray.pipeline.shard_group import ShardGroup
from nesta_ray.pipeline.shard_weights import DENSE, Weights, at_ranks, staged
from nesta_ray.pipeline.tasks import Work
from nesta_ray.plan.linears import Plan, plan_for
from nesta_ray.plan.sizing import shard_plan


def _prepare(cfg: JobConfig, progress: Progress) -> JobContext:
    """Everything a job checks and reads before it computes; refuses a job that cannot fit (auto: at its largest
    ranks) or cannot write its output before any work."""
    start = time.perf_counter()
    source = resolve_source(cfg)
    sized = cfg.with_ratio(cfg.method.auto.min_ratio) if cfg.method.auto else cfg
    checks = preflight(cfg, source.hf_config, plan_for(source.skeleton, sized), dry=False, source=source.model)
    if cfg.runtime.workers:
        shard_plan(sized, plan_for(source.skeleton, sized), source.hf_config)
    tokenizer = load_tokenizer(source.model.folder)
    texts = TextCache(tokenizer)
    calib, evals = calibration_ids(cfg, texts), evaluation_ids(cfg, texts)
    cases = read_cases(cfg.gate.cases, cfg.gate.storage_options) if cfg.gate and cfg.gate.cases else []
    ensure_ray(cfg.runtime.ray_address, cfg.runtime.num_cpus)
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.fingerprint()[:8]}-{uuid.uuid4().hex[:6]}"
    ctx = JobContext(cfg, source, tokenizer, texts, calib, evals, cases,
                     JobMetrics("compress", run_id, cfg.model.source), progress,
                     {"run_id": run_id, "perplexity": {}, "warnings": checks.warnings})
    ctx.timings["load"] = time.perf_counter() - start
    return ctx


def open_runner(cfg: JobConfig, source: Source, work: Work, stage: LayerStage | None,
                markers: str) -> InProcessModel | ShardGroup:
    """The runner this config asks for: ``runtime.workers`` layer shards, or the whole model in this process."""
    if cfg.runtime.workers:
        return ShardGroup(source.model, work, stage, cfg.runtime.workers, shard_options(cfg, markers))
    model, _ = load_source(source.model, getattr(torch, cfg.model.dtype))
    return InProcessModel(model, work, stage)


def _evaluate(ctx: JobContext, runner: Runner, weights: Weights, label: str) -> dict[str, dict[str, Any]]:
    """Perplexity of every evaluation set under ``weights``."""
    task = ctx.progress.add_task(f"evaluate {label}", total=len(ctx.evals))
    out = {}
    for name, ids in ctx.evals.items():
        sums = runner.window_nll(ids, weights, ctx.cfg.evaluation.batch_size)
        out[name] = perplexity_of(sums, ids.shape[1], name).as_dict()
        ctx.progress.advance(task)
    return out


def _choose_ratio(ctx: JobContext, runner: Runner, dense: dict[str, dict[str, Any]]) -> None:
    """``ratio: auto``: choose the ratio, fix it in ``ctx.cfg`` and stage its factors (the job then finds those
    layers done)."""
    auto = ctx.cfg.method.auto
    assert auto is not None
    start = time.perf_counter()
    choice = choose_ratio(runner, ctx.cfg, ctx.source.skeleton, ctx.calib, ctx.evals[auto.set],
                          dense[auto.set]["perplexity"])
    ctx.cfg = ctx.cfg.with_ratio(choice.ratio)
    todo = runner.stage_ratio(choice.chosen)
    ctx.report["auto_ratio"] = {"set": auto.set, "max_increase": auto.max_increase, **choice.summary(),
                                "staged_layers": todo}
    ctx.timings["auto_ratio"] = time.perf_counter() - start


def _allocate(ctx: JobContext, runner: Runner, plan: Plan, stage: LayerStage) -> Plan:
    """``allocation: sensitivity``: measure and allocate the ranks of the uniform ``plan`` (or take the allocation
    a previous run of this job staged), then stage the factors at them (the job then finds those layers done);
    returns the allocated plan (the linears kept dense left out)."""
    start = time.perf_counter()
    seconds: dict[str, float] = {}
    allocation = stage.allocation()
    reused = allocation is not None
    if allocation is None:
        allocation, seconds = allocate_for(runner, plan, ctx.calib, ctx.cfg.method.sensitivity_windows)
        stage.put_allocation(allocation)
    allocated = plan.allocated(allocation.ranks, ctx.cfg.method.as_method())
    todo = sorted(set(allocated.layers()) - stage.done())
    if todo:
        if reused:  # a rerun: the SVDs again, not the backward pass
            runner.prepare(ctx.calib)
        factors_start = time.perf_counter()
        runner.stage_ratio(at_ranks(allocation.ranks))
        seconds["factors"] = time.perf_counter() - factors_start
    ctx.report["allocation"] = {**allocation_summary(allocation, plan), "windows": ctx.cfg.method.sensitivity_windows,
                                "reused_from_stage": reused, "staged_layers": todo,
                                "seconds": {k: round(v, 3) for k, v in seconds.items()}}
    ctx.timings["allocation"] = time.perf_counter() - start
    return allocated


def _compress(ctx: JobContext, runner: InProcessModel | ShardGroup, plan: Plan, stage: LayerStage) -> list[int]:
    """Calibrate and decompose the layers not staged yet (on the shards or in the embedded loop); returns the
    layers computed in this run. Afterwards every planned layer is staged and the runner computes with them."""
    cfg = ctx.cfg
    computed = sorted(set(plan.layers()) - stage.done())
    if not computed:
        ctx.progress.add_task(f"all {len(plan.layers())} layers already staged", total=None)
        return []
    if isinstance(runner, ShardGroup):
        ctx.progress.add_task(f"calibrate + decompose on {cfg.runtime.workers} layer shards", total=None)
        out = runner.compress(ctx.calib)
        ctx.timings.update(out["timings"])
        return out["computed"]  # fewer than planned when a restarted shard found layers staged
    runner.keep_dense()
    layers = ctx.progress.add_task("calibrate layers", total=max(plan.layers()) + 1)
    linears = ctx.progress.add_task("decompose linears", total=len(plan.modules))
    _, lw = compress_layerwise(runner.model, ctx.source.spec, ctx.calib, runner.work, stage=stage,
                               on_layer=lambda i: ctx.progress.advance(layers),
                               on_group=lambda r: ctx.progress.advance(linears, len(r)))
    ctx.timings["calibration"], ctx.timings["decomposition_wait"] = lw.calibration, lw.decomposition_wait
    runner.adopt_stage()
    return computed


def _gate(ctx: JobContext, runner: Runner, weights: Weights) -> None:
    """Check the quality gate (when configured) against the evaluated perplexities and the critical cases."""
    gate = ctx.cfg.gate
    if gate is None:
        return
    outputs = run_cases(lambda seq: runner.next_token(seq, weights), ctx.tokenizer, ctx.cases,
                        gate.max_new_tokens) if ctx.cases else {}
    result = check_gate(ctx.report["perplexity"], gate.max_increase, ctx.cases, outputs)
    ctx.report["gate"], ctx.report["gate_summary"] = result.as_dict(), result.summary()
    ctx.metrics.gate(result.passed)


def _lifecycle(ctx: JobContext, runner: InProcessModel | ShardGroup, stage: LayerStage) -> Plan:
    """Dense evaluation, the ratio (auto), compression, compressed evaluation, generation and the gate, all on
    ``runner``; returns the plan of the chosen ratio."""
    cfg, start = ctx.cfg, time.perf_counter()
    dense = _evaluate(ctx, runner, DENSE, "dense") if cfg.evaluation.dense else {}
    ctx.timings["evaluate_dense"] = time.perf_counter() - start
    if cfg.method.auto:
        _choose_ratio(ctx, runner, dense)
    plan = plan_for(ctx.source.skeleton, ctx.cfg)
    staged_before = sorted(stage.done() & set(plan.layers()))
    start = time.perf_counter()  # compress_total: every step that makes the factors, the rank allocation included
    if cfg.method.allocation == "sensitivity":
        plan = _allocate(ctx, runner, plan, stage)
    ctx.metrics.layers_total(len(plan.layers()))
    computed = _compress(ctx, runner, plan, stage)
    ctx.timings["compress_total"] = time.perf_counter() - start
    start, weights = time.perf_counter(), staged(stage)
    compressed = _evaluate(ctx, runner, weights, "compressed")
    if ctx.cfg.evaluation.prompt:
        ctx.report["generation"] = {"prompt": ctx.cfg.evaluation.prompt, "compressed": generate(
            lambda seq: runner.next_token(seq, weights), ctx.tokenizer, ctx.cfg.evaluation.prompt,
            ctx.cfg.evaluation.max_new_tokens)}
    ctx.timings["evaluate_compressed"] = time.perf_counter() - start
    ctx.report["perplexity"] = {k: {"dense": dense.get(k), "compressed": v} for k, v in compressed.items()}
    _gate(ctx, runner, weights)
    if isinstance(runner, ShardGroup):
        ctx.report["shards"] = runner.reports()  # per shard: layers, device, peak memory, seconds, bytes read
    auto_layers = [i for key in ("auto_ratio", "allocation") for i in ctx.report.get(key, {}).get("staged_layers", [])]
    ctx.report["resume"] = {"layers": len(plan.layers()), "stage": stage.uri,
                            "staged_before": sorted(set(staged_before) - set(auto_layers)),
                            "computed": sorted(set(computed) | set(auto_layers))}
    return plan


def run_job(cfg: JobConfig) -> dict[str, Any]:
    """Run a whole job for a validated config; returns the run report (also written with the run).

    Both runners stage each finished layer under ``<output>/staging/<job fingerprint>`` and the reducer writes the
    checkpoint from the source and the stage, so a rerun of the same job resumes where the last one stopped.
    With ``runtime.workers`` no process holds the whole model: the shards evaluate, generate, choose the ratio,
    and the reducer and the dense export stream layer by layer.
    """
    t_start = time.perf_counter()
    with progress_bars(cfg.runtime.progress) as progress:
        ctx = _prepare(cfg, progress)
        stage = job_stage(ctx)
        sized = cfg.with_ratio(cfg.method.auto.min_ratio) if cfg.method.auto else cfg
        work = Work(plan_for(ctx.source.skeleton, sized), cfg.method.as_method(), cfg.calibration.micro_batch,
                    cfg.calibration.mode, cfg.runtime.threads_per_task, cfg.calibration.precision,
                    cfg.runtime.factorization, cfg.runtime.decompose_precision)
        with open_runner(cfg, ctx.source, work, stage, join(stage.uri, "faults")) as runner:
            plan = _lifecycle(ctx, runner, stage)
        ctx.report.update(ctx.texts.report())
        write_task = progress.add_task("write checkpoint", total=1)
        write_run(ctx, plan, stage, t_start)
        stage.clear()  # its factors now live in the committed run
        progress.advance(write_task)
    return ctx.report
