"""The job: plan, calibrate + decompose (embedded loop or layer-shard actors), evaluate, gate, write, commit.

Order of work: resolve the model and check the output storage (before any compute), plan on the meta device,
refuse a job that cannot fit, read text, choose the ratio (``ratio: auto``), evaluate dense, calibrate +
decompose (staging each finished layer), evaluate compressed, gate, assemble the checkpoint from the source and
the stage, commit, publish. This module only orchestrates: every step is a call into the module that owns it.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.progress import Progress
from torch import nn

from nesta_ray.checkpoint.layout import REPORT_HTML, REPORT_JSON, REPORT_MD, tied_aliases
from nesta_ray.checkpoint.meta import LinearRecord, RunMeta
from nesta_ray.checkpoint.runs import RunWriter
from nesta_ray.checkpoint.stage import LayerStage, job_fingerprint
from nesta_ray.checkpoint.writer import write_dense, write_meta, write_model_files, write_weights
from nesta_ray.config.schema import JobConfig
from nesta_ray.data.text import fingerprint_tokens
from nesta_ray.data.windows import TextCache, calibration_ids, evaluation_ids
from nesta_ray.io.sources import fingerprint_model, load_model, resolve_model
from nesta_ray.io.storage import check_storage
from nesta_ray.model.arch import ArchSpec, arch_for
from nesta_ray.model.lowrank import install_factors
from nesta_ray.model.lowrank_linear import LowRankLinear
from nesta_ray.ops.evaluation import generate, perplexity
from nesta_ray.ops.gate import Case, check_gate, read_cases, run_cases
from nesta_ray.ops.metrics import JobMetrics
from nesta_ray.pipeline.autoratio import choose_ratio
from nesta_ray.pipeline.backends import BackendSpec
from nesta_ray.pipeline.embedded import compress_layerwise
from nesta_ray.pipeline.progress import progress_bars
from nesta_ray.pipeline.ray_env import ensure_ray
from nesta_ray.pipeline.shard_group import compress_sharded
from nesta_ray.pipeline.shard_worker import ShardOptions
from nesta_ray.pipeline.tasks import Work
from nesta_ray.plan.linears import Plan, plan_for
from nesta_ray.plan.sizing import shard_plan
from nesta_ray.report.html import render_html
from nesta_ray.report.markdown import json_safe, run_markdown, total_fallbacks


@dataclass
class Source:
    """The resolved source model: its local folder, transformers config, a meta-device skeleton, architecture and
    fingerprint."""

    folder: str
    hf_config: Any
    skeleton: nn.Module
    spec: ArchSpec
    fingerprint: str


@dataclass
class JobContext:
    """What every phase of one job reads and adds to: the config (its ratio fixed once chosen), the source, the
    text, the driver's model (None when the shards hold the only copy), the report, timings and metrics."""

    cfg: JobConfig
    source: Source
    tokenizer: Any
    texts: TextCache
    calib: torch.Tensor
    evals: dict[str, torch.Tensor]
    cases: list[Case]
    model: nn.Module | None
    metrics: JobMetrics
    progress: Progress
    report: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def open_source(cfg: JobConfig) -> Source:
    """Resolve the model (converting or copying it once) and build its skeleton on the meta device. Raises
    ModelError for a missing or unsupported model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = resolve_model(cfg.model.source, cfg.model.cache_dir, cfg.model.storage_options)
    hf_config = AutoConfig.from_pretrained(folder)
    spec = arch_for(hf_config.model_type)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    return Source(folder, hf_config, skeleton, spec, fingerprint_model(folder))


def _needs_model(cfg: JobConfig, evals: dict[str, torch.Tensor], cases: list[Case]) -> bool:
    """Whether the driver loads the whole model: for the embedded loop, evaluation, the gate's cases, a dense
    export or the automatic ratio."""
    return (not cfg.runtime.workers or bool(evals) or cfg.output.export_dense or bool(cases)
            or cfg.method.auto is not None)


def _prepare(cfg: JobConfig, progress: Progress) -> JobContext:
    """Everything a job checks and reads before it computes; refuses a job that cannot fit (auto: at its
    largest ranks) or cannot write its output before any work."""
    from transformers import AutoTokenizer

    start = time.perf_counter()
    source = open_source(cfg)
    check_storage(cfg.output.uri, cfg.output.storage_options, write=True)
    if cfg.runtime.workers:
        sized = cfg.with_ratio(cfg.method.auto.min_ratio) if cfg.method.auto else cfg
        shard_plan(sized, plan_for(source.skeleton, sized), source.hf_config)
    tokenizer = AutoTokenizer.from_pretrained(source.folder)
    texts = TextCache(tokenizer)
    calib, evals = calibration_ids(cfg, texts), evaluation_ids(cfg, texts)
    cases = read_cases(cfg.gate.cases, cfg.gate.storage_options) if cfg.gate and cfg.gate.cases else []
    model = load_model(source.folder, getattr(torch, cfg.model.dtype))[0] if _needs_model(cfg, evals, cases) else None
    ensure_ray(cfg.runtime.ray_address, cfg.runtime.num_cpus)
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.fingerprint()[:8]}-{uuid.uuid4().hex[:6]}"
    ctx = JobContext(cfg, source, tokenizer, texts, calib, evals, cases, model,
                     JobMetrics("compress", run_id, cfg.model.source), progress, {"run_id": run_id, "perplexity": {}})
    ctx.timings["load"] = time.perf_counter() - start
    return ctx


def _choose_ratio(ctx: JobContext, stage_for: Any) -> None:
    """``ratio: auto``: choose the ratio, fix it in ``ctx.cfg`` and stage its factors (the job then finds those
    layers done)."""
    auto = ctx.cfg.method.auto
    assert auto is not None and ctx.model is not None
    start = time.perf_counter()
    choice = choose_ratio(ctx.model, ctx.cfg, ctx.calib, ctx.evals[auto.set])
    ctx.cfg = ctx.cfg.with_ratio(choice.ratio)
    plan = plan_for(ctx.source.skeleton, ctx.cfg)
    stage: LayerStage = stage_for(ctx)
    todo = sorted(set(plan.layers()) - stage.done())
    for layer in todo:
        stage.put(layer, {name: choice.chosen[name] for name in plan.names(layer)})
    ctx.report["auto_ratio"] = {"set": auto.set, "max_increase": auto.max_increase, **choice.summary(),
                                "staged_layers": todo}
    ctx.timings["auto_ratio"] = time.perf_counter() - start


def _stage(ctx: JobContext) -> LayerStage:
    """This job's stage: keyed by the config, the source model, the calibration tokens and the code."""
    key = job_fingerprint(ctx.cfg.fingerprint(), ctx.source.fingerprint, fingerprint_tokens(ctx.calib))
    return LayerStage(ctx.cfg.output.uri, key, ctx.cfg.output.storage_options)


def _evaluate(ctx: JobContext, label: str) -> dict[str, dict[str, Any]]:
    """Perplexity of the driver's model (as it is now) on every evaluation set."""
    if ctx.model is None:
        return {}
    task = ctx.progress.add_task(f"evaluate {label}", total=len(ctx.evals))
    out = {}
    for name, ids in ctx.evals.items():
        out[name] = perplexity(ctx.model, ids, name=name).as_dict()
        ctx.progress.advance(task)
    return out


def _compress(ctx: JobContext, plan: Plan, stage: LayerStage, staged: list[int]) -> list[int]:
    """Calibrate and decompose the layers not staged yet, on layer shards or in the embedded loop; returns the
    layers computed in this run. Afterwards every planned layer is staged (and installed in the driver's model)."""
    cfg, cal = ctx.cfg, ctx.cfg.calibration
    work = Work(plan, cfg.method.as_method(), cal.micro_batch, cal.mode, cfg.runtime.threads_per_task)
    computed = sorted(set(plan.layers()) - set(staged))
    if not computed:
        ctx.progress.add_task(f"all {len(staged)} layers already staged", total=None)
    elif cfg.runtime.workers:
        ctx.progress.add_task(f"calibrate + decompose on {cfg.runtime.workers} layer shards", total=None)
        rt = cfg.runtime
        options = ShardOptions(cfg.model.dtype, BackendSpec(rt.backend, rt.offload, rt.nvme_path), rt.fail_at_layer)
        out = compress_sharded(ctx.source.folder, ctx.calib, work, stage, rt.workers, options)
        ctx.timings.update(out["timings"])
        computed = out["computed"]  # fewer than planned when a restarted shard found layers staged
    else:
        assert ctx.model is not None
        layers = ctx.progress.add_task("calibrate layers", total=max(plan.layers()) + 1)
        linears = ctx.progress.add_task("decompose linears", total=len(plan.modules))
        _, lw = compress_layerwise(ctx.model, ctx.source.spec, ctx.calib, work, stage=stage,
                                   on_layer=lambda i: ctx.progress.advance(layers),
                                   on_group=lambda r: ctx.progress.advance(linears, len(r)))
        ctx.timings["calibration"], ctx.timings["decomposition_wait"] = lw.calibration, lw.decomposition_wait
    if ctx.model is not None and not any(isinstance(m, LowRankLinear) for m in ctx.model.modules()):
        for i in plan.layers():
            install_factors(ctx.model, stage.get(i))
    return computed


def _gate(ctx: JobContext) -> None:
    """Check the quality gate (when configured) against the evaluated perplexities and the critical cases."""
    gate = ctx.cfg.gate
    if gate is None:
        return
    outputs = {}
    if ctx.cases:
        assert ctx.model is not None  # _needs_model: cases load the driver's model
        outputs = run_cases(ctx.model, ctx.tokenizer, ctx.cases, gate.max_new_tokens)
    result = check_gate(ctx.report["perplexity"], gate.max_increase, ctx.cases, outputs)
    ctx.report["gate"], ctx.report["gate_summary"] = result.as_dict(), result.summary()
    ctx.metrics.gate(result.passed)


def run_job(cfg: JobConfig) -> dict[str, Any]:
    """Run a whole job for a validated config; returns the run report (also written with the run).

    Both paths stage each finished layer under ``<output>/staging/<job fingerprint>`` and the reducer writes the
    checkpoint from the source and the stage, so a rerun of the same job resumes where the last one stopped.
    The driver loads the whole model only for the embedded path, evaluation, the gate, a dense export or the
    automatic ratio.
    """
    t_start = time.perf_counter()
    with progress_bars(cfg.runtime.progress) as progress:
        ctx = _prepare(cfg, progress)
        if ctx.cfg.method.auto:
            _choose_ratio(ctx, _stage)
        plan, stage = plan_for(ctx.source.skeleton, ctx.cfg), _stage(ctx)
        staged = sorted(stage.done() & set(plan.layers()))
        ctx.metrics.layers_total(len(plan.layers()))
        ctx.report.update(ctx.texts.report())
        start = time.perf_counter()
        dense = _evaluate(ctx, "dense") if ctx.cfg.evaluation.dense else {}
        ctx.timings["evaluate_dense"] = time.perf_counter() - start
        start = time.perf_counter()
        computed = _compress(ctx, plan, stage, staged)
        auto_layers = ctx.report.get("auto_ratio", {}).get("staged_layers", [])
        ctx.timings["compress_total"] = time.perf_counter() - start
        start = time.perf_counter()
        compressed = _evaluate(ctx, "compressed")
        if ctx.model is not None and ctx.cfg.evaluation.prompt:
            ctx.report["generation"] = {"prompt": ctx.cfg.evaluation.prompt, "compressed": generate(
                ctx.model, ctx.tokenizer, ctx.cfg.evaluation.prompt, ctx.cfg.evaluation.max_new_tokens)}
        ctx.timings["evaluate_compressed"] = time.perf_counter() - start
        ctx.report["perplexity"] = {k: {"dense": dense.get(k), "compressed": v} for k, v in compressed.items()}
        _gate(ctx)
        ctx.report["resume"] = {"layers": len(plan.layers()), "staged_before": sorted(set(staged) - set(auto_layers)),
                                "computed": sorted(set(computed) | set(auto_layers)), "stage": stage.uri}
        write_task = progress.add_task("write checkpoint", total=1)
        _write_run(ctx, plan, stage, t_start)
        stage.clear()  # its factors now live in the committed run
        progress.advance(write_task)
    return ctx.report


def _summary(ctx: JobContext, plan: Plan, records: dict[str, LinearRecord]) -> dict[str, Any]:
    """The report's description of the run: model, method, calibration, parameters, linears, fallbacks."""
    cfg = ctx.cfg
    return {
        "model": {"source": cfg.model.source, "model_type": ctx.source.hf_config.model_type,
                  "fingerprint": ctx.source.fingerprint},
        "method": cfg.method.model_dump(),
        "calibration": {**cfg.calibration.model_dump(mode="json", exclude={"logs": {"storage_options"}}),
                        "tokens": ctx.calib.numel(), "fingerprint": fingerprint_tokens(ctx.calib)},
        "parameters": {"linears_before": plan.params_before, "linears_after": plan.params_after,
                       "model_before": plan.model_params,
                       "model_after": plan.model_params - plan.params_before + plan.params_after},
        "modules": {p.name: records[p.name].as_dict() for p in plan.modules},
        "fallbacks": total_fallbacks(r.fallbacks for r in records.values()),
        "config_fingerprint": cfg.fingerprint(),
    }


def _meta(ctx: JobContext, records: dict[str, LinearRecord]) -> RunMeta:
    r, cfg = ctx.report, ctx.cfg
    assert isinstance(cfg.method.ratio, float)
    return RunMeta(r["run_id"], cfg.model.dtype, cfg.method.as_method(), cfg.method.ratio,
                   {p: records[p] for p in r["modules"]}, tied_aliases(ctx.source.skeleton), r["parameters"],
                   r["fallbacks"], {"model": r["model"]["fingerprint"], "calibration": r["calibration"]["fingerprint"],
                                    "config": r["config_fingerprint"]})


def _layer_metrics(ctx: JobContext, plan: Plan, records: dict[str, LinearRecord]) -> None:
    """One layer_done per layer computed in this run: summed seconds, mean relative loss, summed fallbacks."""
    for layer in ctx.report["resume"]["computed"]:
        mine = [records[n] for n in plan.names(layer)]
        ctx.metrics.layer_done(layer, sum(r.seconds for r in mine), sum(r.relative_loss for r in mine) / len(mine),
                               total_fallbacks(r.fallbacks for r in mine))


def _write_run(ctx: JobContext, plan: Plan, stage: LayerStage, t_start: float) -> None:
    """Assemble, describe and commit the run (shards from source + stage, model files, nesta.json, reports), and
    record the layers computed in this run, the bytes written and the duration as metrics."""
    start = time.perf_counter()
    cfg, report = ctx.cfg, ctx.report
    writer = RunWriter(cfg.output.uri, report["run_id"], cfg.output.storage_options)
    records = write_weights(writer, ctx.source.folder, plan, stage, ctx.source.spec,
                            ctx.source.hf_config.num_hidden_layers, cfg.output.shard_bytes)
    write_model_files(writer, ctx.source.folder, {name: r.rank for name, r in records.items()}, cfg.model.dtype)
    report.update(_summary(ctx, plan, records))
    _layer_metrics(ctx, plan, records)
    write_meta(writer, _meta(ctx, records))
    if cfg.output.export_dense:
        assert ctx.model is not None
        write_dense(writer, ctx.model, ctx.tokenizer)
    ctx.timings["write"] = time.perf_counter() - start
    ctx.timings["total"] = time.perf_counter() - t_start
    report["timings"] = {k: round(v, 3) for k, v in ctx.timings.items()}
    report["run_uri"] = writer.run_uri
    report["published"] = report.get("gate", {}).get("passed", True)  # a failed gate keeps latest where it was
    writer.put_json(REPORT_JSON, json_safe(report))
    writer.put_bytes(REPORT_MD, run_markdown(report).encode())
    writer.put_bytes(REPORT_HTML, render_html(json_safe(report), sweep_rows=_auto_rows(report)).encode())
    writer.commit(publish=report["published"])
    ctx.metrics.bytes_written(writer.bytes_written)
    ctx.metrics.run_finished(ctx.timings["total"])


def _auto_rows(report: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The automatic ratio's walked curve as ratio-vs-perplexity rows (dense first), or None without one."""
    a = report.get("auto_ratio")
    if not a:
        return None
    return [{"method": "dense", "ratio": 0.0, "perplexity": {a["set"]: a["dense_perplexity"]}}] + [
        {"method": report["method"]["name"], "ratio": p["ratio"], "perplexity": {a["set"]: p["perplexity"]}}
        for p in a["points"]]
