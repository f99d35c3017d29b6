"""Writing a job's run: the weights from the source and the stage (the reducer), the model files, nesta.json,
an optional dense export, the run report in three formats, the commit, and the run's metrics."""

from __future__ import annotations

import time
from typing import Any

from nesta_ray.checkpoint.layout import REPORT_HTML, REPORT_JSON, REPORT_MD
from nesta_ray.checkpoint.meta import LinearRecord, RunMeta
from nesta_ray.checkpoint.runs import RunWriter
from nesta_ray.checkpoint.stage import LayerStage
from nesta_ray.checkpoint.writer import write_dense, write_meta, write_model_files, write_weights
from nesta_ray.data.text import fingerprint_tokens
from nesta_ray.model.layers import tied_aliases
from nesta_ray.pipeline.context import JobContext
from nesta_ray.plan.linears import Plan
from nesta_ray.redaction import redact_obj
from nesta_ray.report.html import render_html
from nesta_ray.report.markdown import json_safe, run_markdown, total_fallbacks


def _summary(ctx: JobContext, plan: Plan, records: dict[str, LinearRecord]) -> dict[str, Any]:
    """The report's description of the run: model, method, calibration, parameters, linears, fallbacks."""
    cfg = ctx.cfg
    kept = ctx.report.get("allocation", {}).get("dense_params", 0)  # targeted linears an allocation kept dense
    return {
        "model": {"source": cfg.model.source, "model_type": ctx.source.hf_config.model_type,
                  "fingerprint": ctx.source.fingerprint},
        "method": cfg.method.model_dump(),
        "calibration": {**cfg.calibration.model_dump(mode="json", exclude={"logs": {"storage_options"}}),
                        "tokens": ctx.calib.numel(), "fingerprint": fingerprint_tokens(ctx.calib)},
        "parameters": {"linears_before": plan.params_before + kept, "linears_after": plan.params_after + kept,
                       "model_before": plan.model_params,
                       "model_after": plan.model_params - plan.params_before + plan.params_after},
        "modules": {p.name: records[p.name].as_dict() for p in plan.modules},
        "fallbacks": total_fallbacks(r.fallbacks for r in records.values()),
        "config_fingerprint": cfg.fingerprint(),
    }


def _meta(ctx: JobContext, records: dict[str, LinearRecord]) -> RunMeta:
    r, cfg = ctx.report, ctx.cfg
    assert isinstance(cfg.method.ratio, float)
    fingerprints = {"model": r["model"]["fingerprint"], "calibration": r["calibration"]["fingerprint"],
                    "config": r["config_fingerprint"]}
    return RunMeta(r["run_id"], cfg.model.dtype, cfg.method.as_method(), cfg.method.ratio,
                   {p: records[p] for p in r["modules"]}, tied_aliases(ctx.source.skeleton), r["parameters"],
                   r["fallbacks"], fingerprints)


def _layer_metrics(ctx: JobContext, plan: Plan, records: dict[str, LinearRecord]) -> None:
    """One layer_done per layer computed in this run: summed seconds, mean relative loss, summed fallbacks."""
    for layer in ctx.report["resume"]["computed"]:
        mine = [records[n] for n in plan.names(layer)]
        ctx.metrics.layer_done(layer, sum(r.seconds for r in mine), sum(r.relative_loss for r in mine) / len(mine),
                               total_fallbacks(r.fallbacks for r in mine))


def _auto_rows(report: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The automatic ratio's walked curve as ratio-vs-perplexity rows (dense first), or None without one."""
    a = report.get("auto_ratio")
    if not a:
        return None
    return [{"method": "dense", "ratio": 0.0, "perplexity": {a["set"]: a["dense_perplexity"]}}] + [
        {"method": report["method"]["name"], "ratio": p["ratio"], "perplexity": {a["set"]: p["perplexity"]}}
        for p in a["points"]]


def write_run(ctx: JobContext, plan: Plan, stage: LayerStage, t_start: float) -> None:
    """Assemble, describe and commit the run (shards from source + stage, model files, nesta.json, reports), and
    record the layers computed in this run, the bytes written and the duration as metrics."""
    start = time.perf_counter()
    cfg, report, src = ctx.cfg, ctx.report, ctx.source
    writer = RunWriter(cfg.output.uri, report["run_id"], cfg.output.storage_options)
    layers = src.hf_config.num_hidden_layers
    records = write_weights(writer, src.model, plan, stage, src.spec, layers, cfg.output.shard_bytes)
    write_model_files(writer, src.model.folder, {name: r.rank for name, r in records.items()}, cfg.model.dtype)
    report.update(_summary(ctx, plan, records))
    _layer_metrics(ctx, plan, records)
    write_meta(writer, _meta(ctx, records))
    if cfg.output.export_dense:
        write_dense(writer, src.model, plan, stage, src.spec, layers, cfg.output.shard_bytes)
    ctx.timings["write"] = time.perf_counter() - start
    ctx.timings["total"] = time.perf_counter() - t_start
    report["timings"] = {k: round(v, 3) for k, v in ctx.timings.items()}
    report["run_uri"] = writer.run_uri
    report["published"] = report.get("gate", {}).get("passed", True)  # a failed gate keeps latest where it was
    shown = redact_obj(report)  # no URI userinfo, no storage_options values in what is written
    writer.put_json(REPORT_JSON, json_safe(shown))
    writer.put_bytes(REPORT_MD, run_markdown(shown).encode())
    writer.put_bytes(REPORT_HTML, render_html(json_safe(shown), sweep_rows=_auto_rows(shown)).encode())
    writer.commit(publish=report["published"])
    ctx.metrics.bytes_written(writer.bytes_written)
    ctx.metrics.run_finished(ctx.timings["total"])
