"""The job driver: plan, calibrate + decompose (embedded loop or layer-shard actors), evaluate, write, commit.

Order of work: resolve the model and check the output storage (before any compute), plan on the meta device,
refuse a job that cannot fit, read text, evaluate dense, calibrate + decompose (staging each finished layer),
evaluate compressed, assemble the checkpoint from the source and the stage, commit, publish.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from contextlib import contextmanager
from typing import Iterator

import ray
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from nesta_ray import __version__
from nesta_ray.checkpoint import FORMAT, FORMAT_VERSION, NESTA_JSON, dense_copy
from nesta_ray.config import JobConfig, TextSource
from nesta_ray.data import fingerprint_tokens, pick_windows, read_dataset, read_text, token_windows
from nesta_ray.errors import ConfigError
from nesta_ray.evaluate import generate, perplexity
from nesta_ray.gate import check_gate, read_cases, run_cases
from nesta_ray.html_report import render_html
from nesta_ray.metrics import JobMetrics
from nesta_ray.models import LowRankLinear, arch_for
from nesta_ray.pipeline.backends import BackendSpec
from nesta_ray.pipeline.autoratio import search_ratio
from nesta_ray.pipeline.layerwise import MethodArgs, compress_layerwise, install_factors
from nesta_ray.pipeline.reducer import tied_aliases, write_from_stage
from nesta_ray.pipeline.plan import ModelShape, Plan, Rates, check_fit, make_plan, shard_report
from nesta_ray.pipeline.shard import StageRef
from nesta_ray.pipeline.sharded import compress_sharded, shard_ranges
from nesta_ray.pipeline.staging import LayerStage, job_fingerprint
from nesta_ray.report import json_safe, run_markdown, total_fallbacks
from nesta_ray.requestlogs import log_calibration_ids
from nesta_ray.sources import fingerprint_model, load_model, model_files, resolve_model
from nesta_ray.storage import RunWriter, check_storage


def ensure_ray(address: str | None, num_cpus: int | None) -> None:
    """Connect to ``address`` (or $RAY_ADDRESS); without either, start a local Ray bound to this machine."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local, loopback-only: no token to hand around
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)


def build_plan(model: torch.nn.Module, cfg: JobConfig) -> Plan:
    """The plan for this job's method settings; ConfigError when the method section names impossible ranks."""
    m = cfg.method
    try:
        return make_plan(model, arch_for(model.config.model_type), method=m.name, ratio=m.ratio,
                         k1_fraction=m.k1_fraction, targets=m.targets, layers=m.layers, rank_overrides=m.rank_overrides)
    except ValueError as err:
        raise ConfigError(f"method: {err}") from None


def with_ratio(cfg: JobConfig, ratio: float) -> JobConfig:
    """``cfg`` with a fixed ``method.ratio`` (and no auto section)."""
    return cfg.model_copy(update={"method": cfg.method.model_copy(update={"ratio": ratio, "auto": None})})


def shard_plan(cfg: JobConfig, plan: Plan, hf_config, rates: Rates | None = None) -> list[dict]:
    """Per-actor memory/bytes (and time, with ``rates``) for ``runtime.workers`` layer shards. Raises ConfigError
    when the shards cannot be formed or one exceeds ``runtime.device_memory_gb`` / ``host_memory_gb``."""
    cal, rt = cfg.calibration, cfg.runtime
    dtype_bytes = torch.finfo(getattr(torch, cfg.model.dtype)).bits // 8
    shape = ModelShape(hf_config.hidden_size, hf_config.intermediate_size, hf_config.num_hidden_layers,
                       hf_config.vocab_size, dtype_bytes, bool(getattr(hf_config, "tie_word_embeddings", False)))
    try:
        ranges = shard_ranges(max(plan.layers()) + 1, rt.workers)
        shards = shard_report(plan, shape, ranges, sequences=cal.num_sequences, seq_len=cal.seq_len,
                              micro_batch=cal.micro_batch, mode=cal.mode, rates=rates,
                              host_weights=not (rt.backend == "deepspeed" and rt.offload == "nvme"))
        check_fit(shards, *[None if v is None else v * 2**30 for v in (rt.device_memory_gb, rt.host_memory_gb)])
    except ValueError as err:
        raise ConfigError(f"runtime: {err}") from None
    return shards


class TextCache:
    """Token windows per (source, seq_len), read and tokenised once per job."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[tuple[str, int], torch.Tensor] = {}
        self.log_selection: dict | None = None  # what calibration_ids picked from request logs, for the report

    def windows(self, src: TextSource, seq_len: int) -> torch.Tensor:
        key = (src.key(), seq_len)
        if key not in self._cache:
            text = (read_text(src.path, src.text_field) if src.path is not None
                    else read_dataset(src.dataset, src.split, src.text_field, src.subset))
            self._cache[key] = token_windows(self.tokenizer, text, seq_len)
        return self._cache[key]


def calibration_ids(cfg: JobConfig, texts: TextCache) -> torch.Tensor:
    """The calibration windows (num_sequences, seq_len) the config selects (from request logs: the selection's report
    is kept in ``texts.log_selection``)."""
    c = cfg.calibration
    if c.logs is not None:
        ids, selection = log_calibration_ids(tokenizer=texts.tokenizer, num_sequences=c.num_sequences,
                                             seq_len=c.seq_len, seed=c.seed, select_method=c.select,
                                             **c.logs.model_dump())
        texts.log_selection = selection.as_dict()
        return ids
    return pick_windows(texts.windows(c, c.seq_len), c.first_window, c.num_windows, c.num_sequences, c.seed, c.select)


def evaluation_ids(cfg: JobConfig, texts: TextCache) -> dict[str, torch.Tensor]:
    """Evaluation windows per set name."""
    e = cfg.evaluation
    return {s.name: pick_windows(texts.windows(s, e.seq_len), s.first_window, s.num_windows, None, 0, "first")
            for s in e.sets}


@contextmanager
def _progress(enabled: bool) -> Iterator[Progress]:
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=Console(stderr=True), disable=not enabled) as progress:
        yield progress


def _evaluate(model: torch.nn.Module, sets: dict[str, torch.Tensor], progress: Progress, label: str) -> dict[str, dict]:
    task = progress.add_task(f"evaluate {label}", total=len(sets))
    out = {}
    for name, ids in sets.items():
        out[name] = perplexity(model, ids, name=name).as_dict()
        progress.advance(task)
    return out


def run_job(cfg: JobConfig) -> dict:
    """Run a whole job for a validated config; returns the run report (also written with the run).

    Both paths stage each finished layer under ``<output>/staging/<job fingerprint>`` and the reducer writes the
    checkpoint from the source and the stage, so a rerun of the same job resumes where the last one stopped.
    The driver loads the whole model only for the embedded path, evaluation or a dense export.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    folder = resolve_model(cfg.model.source, cfg.model.cache_dir, cfg.model.storage_options)
    check_storage(cfg.output.uri, cfg.output.storage_options, write=True)
    hf_config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    spec, auto = arch_for(hf_config.model_type), cfg.method.auto
    if cfg.runtime.workers:  # refuses a job that cannot fit, before any work (auto: at its largest ranks)
        sized = with_ratio(cfg, auto.min_ratio) if auto else cfg
        shard_plan(sized, build_plan(skeleton, sized), hf_config)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = TextCache(tokenizer)
    calib, evals = calibration_ids(cfg, texts), evaluation_ids(cfg, texts)
    model_fp = fingerprint_model(folder)
    cases = read_cases(cfg.gate.cases, cfg.gate.storage_options) if cfg.gate and cfg.gate.cases else []
    need_model = not cfg.runtime.workers or bool(evals) or cfg.output.export_dense or bool(cases) or bool(auto)
    model = load_model(folder, getattr(torch, cfg.model.dtype))[0] if need_model else None
    timings["load"] = time.perf_counter() - t_start
    ensure_ray(cfg.runtime.ray_address, cfg.runtime.num_cpus)
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.fingerprint()[:8]}-{uuid.uuid4().hex[:6]}"
    report: dict = {"run_id": run_id, "perplexity": {}}
    if auto:  # choose the ratio, then stage its factors: the job below finds every layer done
        t = time.perf_counter()
        choice = search_ratio(model, spec, cfg.method, calib, evals[auto.set], micro_batch=cfg.calibration.micro_batch,
                              threads=cfg.runtime.threads_per_task)
        cfg = with_ratio(cfg, choice.ratio)
        report["auto_ratio"] = {"set": auto.set, "max_increase": auto.max_increase, **choice.summary()}
        timings["auto_ratio"] = time.perf_counter() - t
    plan = build_plan(skeleton, cfg)
    stage_ref = StageRef(cfg.output.uri, job_fingerprint(cfg.fingerprint(), model_fp, fingerprint_tokens(calib)),
                         cfg.output.storage_options)
    stage = stage_ref.open()
    staged_before = sorted(stage.done() & set(plan.layers()))
    if auto:
        for layer in sorted(set(plan.layers()) - set(staged_before)):
            stage.put(layer, {p.name: choice.results[p.name] for p in plan.modules if p.layer == layer})
        report["auto_ratio"]["staged_layers"] = sorted(set(plan.layers()) - set(staged_before))
    if texts.log_selection is not None:
        report["log_selection"] = texts.log_selection
    metrics = JobMetrics("compress", run_id, cfg.model.source)
    metrics.layers_total(len(plan.layers()))
    with _progress(cfg.runtime.progress) as progress:
        t = time.perf_counter()
        dense = _evaluate(model, evals, progress, "dense") if model is not None and cfg.evaluation.dense else {}
        timings["evaluate_dense"] = time.perf_counter() - t
        t = time.perf_counter()
        auto_layers = report.get("auto_ratio", {}).get("staged_layers", [])
        computed = _compress(cfg, folder, model, spec, plan, calib, stage_ref, sorted(set(staged_before) | set(auto_layers)),
                             progress, timings)
        computed = sorted(set(computed) | set(auto_layers))
        timings["compress_total"] = time.perf_counter() - t
        t = time.perf_counter()
        compressed = _evaluate(model, evals, progress, "compressed") if model is not None else {}
        if model is not None and cfg.evaluation.prompt:
            report["generation"] = {"prompt": cfg.evaluation.prompt, "compressed": generate(
                model, tokenizer, cfg.evaluation.prompt, cfg.evaluation.max_new_tokens)}
        timings["evaluate_compressed"] = time.perf_counter() - t
        report["perplexity"] = {k: {"dense": dense.get(k), "compressed": v} for k, v in compressed.items()}
        if cfg.gate is not None:
            outputs = run_cases(model, tokenizer, cases, cfg.gate.max_new_tokens) if cases else {}
            gate = check_gate(report["perplexity"], cfg.gate.max_increase, cases, outputs)
            report["gate"], report["gate_summary"] = gate.as_dict(), gate.summary()
            metrics.gate(gate.passed)
        t = time.perf_counter()
        write_task = progress.add_task("write checkpoint", total=1)
        report["resume"] = {"layers": len(plan.layers()), "staged_before": staged_before, "computed": computed,
                            "stage": stage.uri}
        _write_run(cfg, report, folder, skeleton, plan, stage, model, tokenizer, model_fp, calib, timings, t, t_start,
                   metrics)
        stage.clear()  # its factors now live in the committed run
        progress.advance(write_task)
    return report


def _compress(cfg: JobConfig, folder: str, model: torch.nn.Module | None, spec, plan: Plan, calib: torch.Tensor,
              stage_ref: StageRef, staged_before: list[int], progress: Progress, timings: dict) -> list[int]:
    """Calibrate and decompose the layers not staged yet, on layer shards or in the embedded loop; returns the
    layers computed in this run. Afterwards every planned layer is staged (and installed in ``model``, if any)."""
    computed = sorted(set(plan.layers()) - set(staged_before))
    args = MethodArgs(cfg.method.name, cfg.method.k1_fraction, cfg.method.damping, cfg.method.alpha,
                      threads=cfg.runtime.threads_per_task, k1_tolerance=cfg.method.k1_tolerance)
    cal = cfg.calibration
    if not computed:
        progress.add_task(f"all {len(staged_before)} layers already staged", total=None)
    elif cfg.runtime.workers:
        progress.add_task(f"calibrate + decompose on {cfg.runtime.workers} layer shards", total=None)
        out = compress_sharded(folder, plan, calib, workers=cfg.runtime.workers, micro_batch=cal.micro_batch,
                               mode=cal.mode, args=args, dtype=cfg.model.dtype, stage=stage_ref,
                               backend=BackendSpec(cfg.runtime.backend, cfg.runtime.offload, cfg.runtime.nvme_path),
                               fail_at_layer=cfg.runtime.fail_at_layer)
        timings.update(out["timings"])
        computed = out["computed"]  # fewer than planned when a restarted shard found layers staged
    else:
        layers_task = progress.add_task("calibrate layers", total=max(plan.layers()) + 1)
        linears_task = progress.add_task("decompose linears", total=len(plan.modules))
        _, lw = compress_layerwise(
            model, spec, plan, calib, micro_batch=cal.micro_batch, mode=cal.mode, args=args, stage=stage_ref.open(),
            on_layer=lambda i: progress.advance(layers_task), on_group=lambda r: progress.advance(linears_task, len(r)),
        )
        timings["calibration"], timings["decomposition_wait"] = lw.calibration, lw.decomposition_wait
    if model is not None and not any(isinstance(mod, LowRankLinear) for mod in model.modules()):
        stage = stage_ref.open()
        for i in plan.layers():
            install_factors(model, stage.get(i))
    return computed


def _write_run(cfg: JobConfig, report: dict, folder: str, skeleton: torch.nn.Module, plan: Plan, stage: LayerStage,
               model: torch.nn.Module | None, tokenizer, model_fp: str, calib: torch.Tensor, timings: dict,
               t_write: float, t_start: float, metrics: JobMetrics) -> None:
    """Assemble, describe and commit the run (shards from source + stage, model files, nesta.json, reports), and
    record the layers computed in this run, the bytes written and the duration as metrics."""
    hf_config = skeleton.config
    writer = RunWriter(cfg.output.uri, report["run_id"], cfg.output.storage_options)
    stats = write_from_stage(writer, folder, plan, stage, arch_for(hf_config.model_type),
                             hf_config.num_hidden_layers, cfg.output.shard_bytes)
    for path in model_files(folder):
        writer.put_file(os.path.basename(path), path)
    report.update(_summary(cfg, plan, stats, skeleton, model_fp, calib))
    _layer_metrics(metrics, plan, stats, report["resume"]["computed"])
    writer.put_json(NESTA_JSON, _nesta_meta(cfg, report, tied_aliases(skeleton)))
    if cfg.output.export_dense:
        _put_dense(writer, model, tokenizer)
    timings["write"] = time.perf_counter() - t_write
    timings["total"] = time.perf_counter() - t_start
    report["timings"] = {k: round(v, 3) for k, v in timings.items()}
    report["run_uri"] = writer.run_uri
    report["published"] = report.get("gate", {}).get("passed", True)  # a failed gate keeps latest where it was
    writer.put_json("report.json", json_safe(report))
    writer.put_bytes("report.md", run_markdown(report).encode())
    writer.put_bytes("report.html", render_html(json_safe(report), sweep_rows=_auto_rows(report)).encode())
    writer.commit(publish=report["published"])
    metrics.bytes_written(writer.bytes_written)
    metrics.run_finished(timings["total"])


def _auto_rows(report: dict) -> list[dict] | None:
    """The automatic ratio's walked curve as ratio-vs-perplexity rows (dense first), or None without one."""
    a = report.get("auto_ratio")
    if not a:
        return None
    return [{"method": "dense", "ratio": 0.0, "perplexity": {a["set"]: a["dense_perplexity"]}}] + [
        {"method": report["method"]["name"], "ratio": p["ratio"], "perplexity": {a["set"]: p["perplexity"]}}
        for p in a["points"]]


def _layer_metrics(metrics: JobMetrics, plan: Plan, stats: dict[str, dict], computed: list[int]) -> None:
    """One layer_done per layer computed in this run: summed seconds, mean relative loss, summed fallbacks."""
    for layer in computed:
        names = [p.name for p in plan.modules if p.layer == layer]
        metrics.layer_done(layer, sum(stats[n]["seconds"] for n in names),
                           sum(stats[n]["relative_loss"] for n in names) / len(names),
                           total_fallbacks(stats[n] for n in names))


def _summary(cfg: JobConfig, plan: Plan, stats: dict[str, dict], skeleton: torch.nn.Module, model_fp: str,
             calib: torch.Tensor) -> dict:
    modules = {}
    for p in plan.modules:
        r = stats[p.name]
        modules[p.name] = {"rank": p.rank, "k1": r["k1"], "k2": r["k2"], "shape": [p.m, p.n], "loss": r["loss"],
                           "relative_loss": r["relative_loss"], "fallbacks": r["fallbacks"],
                           "seconds": round(r["seconds"], 4)}
    fallbacks = total_fallbacks(modules.values())
    return {
        "model": {"source": cfg.model.source, "model_type": skeleton.config.model_type, "fingerprint": model_fp},
        "method": cfg.method.model_dump(),
        "calibration": {**cfg.calibration.model_dump(mode="json", exclude={"logs": {"storage_options"}}), "tokens": calib.numel(), "fingerprint": fingerprint_tokens(calib)},
        "parameters": {"linears_before": plan.params_before, "linears_after": plan.params_after,
                       "model_before": plan.model_params,
                       "model_after": plan.model_params - plan.params_before + plan.params_after},
        "modules": modules,
        "fallbacks": fallbacks,
        "config_fingerprint": cfg.fingerprint(),
    }


def _nesta_meta(cfg: JobConfig, report: dict, tied: dict[str, str]) -> dict:
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "nesta_ray_version": __version__,
        "run_id": report["run_id"], "dtype": cfg.model.dtype, "method": cfg.method.name, "ratio": cfg.method.ratio,
        "k1_fraction": cfg.method.k1_fraction, "k1_tolerance": cfg.method.k1_tolerance, "damping": cfg.method.damping,
        "alpha": cfg.method.alpha,
        "modules": report["modules"], "fallbacks": report["fallbacks"], "parameters": report["parameters"],
        "tied": tied,
        "fingerprints": {"model": report["model"]["fingerprint"], "calibration": report["calibration"]["fingerprint"],
                         "config": report["config_fingerprint"]},
    }


def _put_dense(writer: RunWriter, model: torch.nn.Module, tokenizer) -> None:
    import copy

    with tempfile.TemporaryDirectory() as tmp:
        dense_copy(copy.deepcopy(model)).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name in sorted(os.listdir(tmp)):
            writer.put_file(f"dense/{name}", os.path.join(tmp, name))
