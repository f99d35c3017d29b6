"""Nightly recompression: ``python -m nesta_ray.nightly --config FILE [--set key=value ...]``.

One night: read tonight's calibration text (the job's calibration source; for request logs, the lines since the
last night), score activation drift of the published checkpoint on a sample of it (``nesta_ray.drift``), and
either skip or run the job, which gates and publishes. Then prune old runs and write a record of the night to
``<output.uri>/nights/<time>.json``. Also runs under ``ray job submit``. Exit code 0 for a skip or a published run,
3 when the new run failed its gate (nothing published), 2 for any error.

Drift is scored in the driver process on the dense source model and the published factors (both in memory): fine
for small and medium models; a 70B model would need the layer-shard actors to gather tonight's Grams.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from typing import Any

import torch

from nesta_ray.checkpoint import NESTA_JSON, load_compressed
from nesta_ray.config import JobConfig, load_config
from nesta_ray.data import pick_windows
from nesta_ray.drift import layer_scores, relative_error
from nesta_ray.errors import NestaError
from nesta_ray.html_report import render_html
from nesta_ray.metrics import JobMetrics
from nesta_ray.models import arch_for
from nesta_ray.pipeline.driver import TextCache, calibration_ids, ensure_ray, run_job
from nesta_ray.pipeline.layerwise import collect_statistics
from nesta_ray.sources import load_model, resolve_model
from nesta_ray.storage import (check_storage, join, list_names, list_runs, put_object, read_json, remove_tree,
                               resolve_run)

NIGHTS = "nights"
STAMP = "%Y%m%dT%H%M%S%fZ"


def published_run(cfg: JobConfig) -> str | None:
    """URI of the run ``latest`` names under the output root, or None before the first publish. Raises
    CheckpointError when ``latest`` names a run that is not there."""
    if "latest" not in list_names(cfg.output.uri, cfg.output.storage_options):
        return None
    return resolve_run(cfg.output.uri, cfg.output.storage_options)


def last_record(cfg: JobConfig) -> dict | None:
    """The newest night record under ``<output.uri>/nights``, or None."""
    root = join(cfg.output.uri, NIGHTS)
    names = [n for n in list_names(root, cfg.output.storage_options) if n.endswith(".json")]
    return read_json(join(root, names[-1]), cfg.output.storage_options) if names else None


def heldout_ids(cfg: JobConfig, texts: TextCache) -> torch.Tensor:
    """Up to ``nightly.sample_sequences`` windows (n, seq_len) of the calibration text's window range that the
    calibration did not use (seeded), for an out-of-sample baseline; (0, seq_len) when there are none. From request
    logs: a seeded random pick of tonight's requests, which may share requests with the calibration selection."""
    c = cfg.calibration
    if c.logs is not None:
        return calibration_ids(cfg.model_copy(update={"calibration": c.model_copy(update={
            "num_sequences": cfg.nightly.sample_sequences, "seed": c.seed + 1, "select": "random"})}), texts)
    pool = pick_windows(texts.windows(c, c.seq_len), c.first_window, c.num_windows, None, c.seed, "first")
    used = {tuple(row.tolist()) for row in calibration_ids(cfg, texts)}
    spare = torch.stack([w for w in pool if tuple(w.tolist()) not in used]) if len(pool) > len(used) else pool[:0]
    order = torch.randperm(len(spare), generator=torch.Generator().manual_seed(c.seed + 1))
    return spare[order[: cfg.nightly.sample_sequences].sort().values]


def run_id_of(run_uri: str) -> str:
    """The run id, the last part of a run URI."""
    return run_uri.rstrip("/").rsplit("/", 1)[1]


def run_errors(cfg: JobConfig, dense: torch.nn.Module, run_uri: str,
               ids: torch.Tensor) -> tuple[dict[str, float], dict[str, int]]:
    """Relative output error of every compressed linear of the run at ``run_uri`` under the Grams of token windows
    ``ids`` (n, L) through ``dense``, the source model (left unchanged), and each linear's layer."""
    opts = cfg.output.storage_options
    meta = read_json(join(run_uri, NESTA_JSON), opts)
    spec = arch_for(dense.config.model_type)
    layer_re = re.compile(rf"^{re.escape(spec.layers)}\.(\d+)\.")
    layer_of = {name: int(layer_re.match(name).group(1)) for name in meta["modules"]}
    stats = collect_statistics(dense, spec, sorted(set(layer_of.values())), ids, cfg.calibration.micro_batch)
    published = load_compressed(run_uri, opts)
    errors = {}
    for name in meta["modules"]:
        gram = torch.from_numpy(stats[layer_of[name]][0][spec.group_of(name.rsplit(".", 1)[1])])  # (n, n)
        low = published.get_submodule(name)
        errors[name] = relative_error(dense.get_submodule(name).weight.detach(), low.A.detach(), low.B.detach(), gram)
    return errors, layer_of


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
    meta = read_json(join(run_uri, NESTA_JSON), cfg.output.storage_options)
    return {k: v["relative_loss"] for k, v in meta["modules"].items()}, "in-sample calibration loss (nesta.json)"


def prune_runs(cfg: JobConfig, keep: int, protect: str | None) -> list[str]:
    """Remove all but the newest ``keep`` runs (never the run ``protect``); returns the removed run ids."""
    runs = list_runs(cfg.output.uri, cfg.output.storage_options)
    kept = set(runs[-keep:]) | ({protect} if protect else set())
    removed = [r for r in runs if r not in kept]
    for run in removed:
        remove_tree(join(cfg.output.uri, "runs", run), cfg.output.storage_options)
    return removed


def tonight_config(cfg: JobConfig, previous: dict | None) -> JobConfig:
    """``cfg`` reading only request logs newer than the previous night (when the config sets no ``since``)."""
    logs = cfg.calibration.logs
    if logs is None or logs.since is not None or previous is None:
        return cfg
    since = datetime.datetime.fromisoformat(previous["time"])
    return cfg.model_copy(update={"calibration": cfg.calibration.model_copy(update={
        "logs": logs.model_copy(update={"since": since})})})


def run_night(cfg: JobConfig, now: datetime.datetime | None = None) -> dict[str, Any]:
    """Score, decide, maybe compress + gate + publish, prune, record. Returns the night's record."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    check_storage(cfg.output.uri, cfg.output.storage_options, write=True)
    previous = last_record(cfg)
    cfg = tonight_config(cfg, previous)
    record: dict[str, Any] = {"time": now.isoformat(), "previous_night": previous and previous["time"],
                              "threshold": cfg.nightly.drift_threshold}
    run_uri = published_run(cfg)
    record["published_before"] = run_uri and run_id_of(run_uri)
    ensure_ray(cfg.runtime.ray_address, cfg.runtime.num_cpus)
    dense, tokenizer = load_model(resolve_model(cfg.model.source, cfg.model.cache_dir, cfg.model.storage_options),
                                  getattr(torch, cfg.model.dtype))  # loaded once per night: scores and baseline
    texts = TextCache(tokenizer)
    if run_uri is None:
        record["decision"], record["reason"] = "recompress", "no published run yet"
    else:
        sample = cfg.model_copy(update={"calibration": cfg.calibration.model_copy(
            update={"num_sequences": cfg.nightly.sample_sequences})})
        ids = calibration_ids(sample, texts)
        now_errors, layer_of = run_errors(cfg, dense, run_uri, ids)
        then_errors, record["baseline_source"] = baseline_errors(cfg, run_uri)
        scores = layer_scores(then_errors, now_errors, layer_of)
        record["drift"] = {"layers": scores, "max": max(scores.values()), "tokens": ids.numel()}
        metrics = JobMetrics("nightly", now.strftime(STAMP), cfg.model.source)
        for layer, score in scores.items():
            metrics.drift(layer, score)
        over = record["drift"]["max"] > cfg.nightly.drift_threshold
        record["decision"] = "recompress" if over else "skip"
        record["reason"] = (f"max layer drift {record['drift']['max']:.3f} {'>' if over else '<='} threshold "
                            f"{cfg.nightly.drift_threshold}")
    if record["decision"] == "recompress":
        report = run_job(cfg)
        record.update(run_id=report["run_id"], published=report["published"],
                      gate=report.get("gate_summary", "no gate configured"))
        heldout = heldout_ids(cfg, texts)
        if report["published"] and len(heldout):
            record["baseline"] = {"run_id": report["run_id"], "tokens": heldout.numel(),
                                  "errors": run_errors(cfg, dense, report["run_uri"], heldout)[0]}
    latest = published_run(cfg)
    record["removed_runs"] = prune_runs(cfg, cfg.nightly.keep_runs, latest and run_id_of(latest))
    stamp = now.strftime(STAMP)
    put_object(join(cfg.output.uri, NIGHTS, f"{stamp}.json"),
               (json.dumps(record, indent=2, sort_keys=True) + "\n").encode(), cfg.output.storage_options)
    if latest is not None:
        put_object(join(cfg.output.uri, NIGHTS, f"{stamp}.html"), night_page(cfg, latest, record).encode(),
                   cfg.output.storage_options)
    return record


def night_page(cfg: JobConfig, run_uri: str, record: dict, nights: int = 7) -> str:
    """The published run's HTML report with the drift per layer of the last ``nights`` nights (this one included)."""
    root, opts = join(cfg.output.uri, NIGHTS), cfg.output.storage_options
    names = [n for n in list_names(root, opts) if n.endswith(".json")][-nights:]
    drift = {}
    for night in [read_json(join(root, n), opts) for n in names[:-1]] + [record]:
        if night.get("drift"):
            drift[f"{night['time'][:16]} ({night['decision']})"] = {int(k): v for k, v in night["drift"]["layers"].items()}
    return render_html(read_json(join(run_uri, "report.json"), opts), drift_runs=drift or None,
                       drift_threshold=cfg.nightly.drift_threshold)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nesta_ray.nightly", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML job config with a nightly section (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    args = parser.parse_args(argv)
    try:
        record = run_night(load_config(args.config, args.set))
    except NestaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(record, indent=2, sort_keys=True))
    print(f"night: {record['decision']} ({record['reason']})", file=sys.stderr)
    return 3 if record.get("published") is False else 0


if __name__ == "__main__":
    sys.exit(main())
