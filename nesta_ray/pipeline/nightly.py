"""Nightly recompression (the CLI is ``nesta_ray.nightly``).

One night: read tonight's calibration text (the job's calibration source; for request logs, the lines since the
last night), score activation drift of the published checkpoint on a sample of it (``nesta_ray.drift``), and
either skip or run the job, which gates and publishes. Then prune old runs and write a record of the night to
``<output.uri>/nights/<time>.json``. Also runs under ``ray job submit``.

Drift is scored where the layers live (``drift_scoring``): with ``runtime.workers`` the layer shards gather
tonight's Grams of their own layers and score them against the published factors they read (only their bytes);
the driver only combines per-linear errors into per-layer scores. A shard that fails for good fails the night
before anything moves ``latest``.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

from nesta_ray.checkpoint.layout import REPORT_JSON, RUNS
from nesta_ray.checkpoint.reader import read_meta
from nesta_ray.checkpoint.runs import list_runs, published_run, run_id_of
from nesta_ray.config.schema import JobConfig
from nesta_ray.data.windows import TextCache, heldout_ids, sample_ids
from nesta_ray.io.sources import load_tokenizer
from nesta_ray.io.storage import check_storage, join, list_names, put_object, read_json, remove_tree
from nesta_ray.method.drift import layer_scores
from nesta_ray.ops.metrics import JobMetrics
from nesta_ray.pipeline.context import resolve_source
from nesta_ray.pipeline.drift_scoring import DriftScorer
from nesta_ray.pipeline.job import run_job
from nesta_ray.pipeline.ray_env import ensure_ray
from nesta_ray.redaction import redact_obj
from nesta_ray.report.html import render_html

NIGHTS = "nights"
STAMP = "%Y%m%dT%H%M%S%fZ"


def last_record(cfg: JobConfig) -> dict | None:
    """The newest night record under ``<output.uri>/nights``, or None."""
    root = join(cfg.output.uri, NIGHTS)
    names = [n for n in list_names(root, cfg.output.storage_options) if n.endswith(".json")]
    return read_json(join(root, names[-1]), cfg.output.storage_options) if names else None


def baseline_errors(cfg: JobConfig, run_uri: str) -> tuple[dict[str, float], str]:
    """Per-linear relative error the run had when it was made: the held-out errors a night recorded after
    publishing it, else (a run not made by a night, or without spare windows) the in-sample calibration loss from
    nesta.json, which understates the error of any new sample; the second value says which."""
    run_id = run_id_of(run_uri)
    root = join(cfg.output.uri, NIGHTS)
    for name in reversed([n for n in list_names(root, cfg.output.storage_options) if n.endswith(".json")]):
        baseline = read_json(join(root, name), cfg.output.storage_options).get("baseline") or {}
        if baseline.get("run_id") == run_id:
            return baseline["errors"], f"held-out windows of the night that made run {run_id}"
    meta = read_meta(run_uri, cfg.output.storage_options)
    return {k: v.relative_loss for k, v in meta.modules.items()}, "in-sample calibration loss (nesta.json)"


def prune_runs(cfg: JobConfig, keep: int, protect: str | None) -> list[str]:
    """Remove all but the newest ``keep`` runs (never the run ``protect``); returns the removed run ids."""
    runs = list_runs(cfg.output.uri, cfg.output.storage_options)
    kept = set(runs[-keep:]) | ({protect} if protect else set())
    removed = [r for r in runs if r not in kept]
    for run in removed:
        remove_tree(join(cfg.output.uri, RUNS, run), cfg.output.storage_options)
    return removed


def tonight_config(cfg: JobConfig, previous: dict | None) -> JobConfig:
    """``cfg`` reading only request logs newer than the previous night (when the config sets no ``since``)."""
    logs = cfg.calibration.logs
    if logs is None or logs.since is not None or previous is None:
        return cfg
    since = datetime.datetime.fromisoformat(previous["time"])
    return cfg.model_copy(update={"calibration": cfg.calibration.model_copy(update={
        "logs": logs.model_copy(update={"since": since})})})


def _score(cfg: JobConfig, scorer: DriftScorer, run_uri: str, texts: TextCache, stamp: str) -> dict[str, Any]:
    """Tonight's drift of the published run: per-layer scores against its baseline, and the decision."""
    ids = sample_ids(cfg, texts, cfg.nightly.sample_sequences)
    now_errors, layer_of = scorer.errors(run_uri, ids)
    then_errors, source = baseline_errors(cfg, run_uri)
    scores = layer_scores(then_errors, now_errors, layer_of)
    metrics = JobMetrics("nightly", stamp, cfg.model.source)
    for layer, score in scores.items():
        metrics.drift(layer, score)
    worst, limit = max(scores.values()), cfg.nightly.drift_threshold
    return {"baseline_source": source, "drift": {"layers": scores, "max": worst, "tokens": ids.numel()},
            "decision": "recompress" if worst > limit else "skip",
            "reason": f"max layer drift {worst:.3f} {'>' if worst > limit else '<='} threshold {limit}"}


def run_night(cfg: JobConfig, now: datetime.datetime | None = None) -> dict[str, Any]:
    """Score, decide, maybe compress + gate + publish, prune, record. Returns the night's record."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    opts = cfg.output.storage_options
    check_storage(cfg.output.uri, opts, write=True)
    previous = last_record(cfg)
    cfg = tonight_config(cfg, previous)
    record: dict[str, Any] = {"time": now.isoformat(), "previous_night": previous and previous["time"],
                              "threshold": cfg.nightly.drift_threshold}
    run_uri = published_run(cfg.output.uri, opts)
    record["published_before"] = run_uri and run_id_of(run_uri)
    ensure_ray(cfg.runtime.ray_address, cfg.runtime.num_cpus)
    source = resolve_source(cfg)
    scorer = DriftScorer(cfg, source)  # in-process: the dense model is loaded once per night
    texts = TextCache(load_tokenizer(source.model.folder))
    if run_uri is None:
        record["decision"], record["reason"] = "recompress", "no published run yet"
    else:
        record.update(_score(cfg, scorer, run_uri, texts, now.strftime(STAMP)))
    if record["decision"] == "recompress":
        report = run_job(cfg)
        record.update(run_id=report["run_id"], published=report["published"],
                      gate=report.get("gate_summary", "no gate configured"))
        heldout = heldout_ids(cfg, texts)
        if report["published"] and len(heldout):
            record["baseline"] = {"run_id": report["run_id"], "tokens": heldout.numel(),
                                  "errors": scorer.errors(report["run_uri"], heldout)[0]}
    latest = published_run(cfg.output.uri, opts)
    record["removed_runs"] = prune_runs(cfg, cfg.nightly.keep_runs, latest and run_id_of(latest))
    stamp = now.strftime(STAMP)
    put_object(join(cfg.output.uri, NIGHTS, f"{stamp}.json"),
               (json.dumps(redact_obj(record), indent=2, sort_keys=True) + "\n").encode(), opts)
    if latest is not None:
        put_object(join(cfg.output.uri, NIGHTS, f"{stamp}.html"), night_page(cfg, latest, record).encode(), opts)
    return record


def night_page(cfg: JobConfig, run_uri: str, record: dict, nights: int = 7) -> str:
    """The published run's HTML report with the drift per layer of the last ``nights`` nights (this one included)."""
    root, opts = join(cfg.output.uri, NIGHTS), cfg.output.storage_options
    names = [n for n in list_names(root, opts) if n.endswith(".json")][-nights:]
    drift = {}
    for night in [read_json(join(root, n), opts) for n in names[:-1]] + [record]:
        if night.get("drift"):
            drift[f"{night['time'][:16]} ({night['decision']})"] = {int(k): v for k,
                                                                    v in night["drift"]["layers"].items()}
    return render_html(read_json(join(run_uri, REPORT_JSON), opts), drift_runs=drift or None,
                       drift_threshold=cfg.nightly.drift_threshold)
