"""CLI: ``python -m nesta_ray.compress --config FILE [--set key=value ...] [--dry-run] [--export-dense]``.

Only argument handling lives here; every ``NestaError`` becomes one line on stderr and exit code 2; a run that
fails its quality gate is kept but not published, and exits with code 3.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

from nesta_ray.config import JobConfig, load_config
from nesta_ray.errors import ConfigError, NestaError
from nesta_ray.report import table


def measure_rates(seconds: float = 0.5) -> dict[str, float]:
    """fp32 matmul and fp64 SVD throughput of this process (GFLOP/s), in about a second."""
    import time

    import torch

    from nesta_ray.pipeline.plan import svd_flops

    def rate(fn, flops):
        fn()
        start, runs = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            fn()
            runs += 1
        return flops * runs / (time.perf_counter() - start) / 1e9

    a = torch.randn(1024, 1024)
    m = torch.randn(384, 1024, dtype=torch.float64)
    return {"matmul_gflops": rate(lambda: a @ a, 2 * 1024**3), "svd_gflops": rate(lambda: torch.linalg.svd(m, full_matrices=False), svd_flops(384, 1024))}


def _hf_config(cfg: JobConfig):
    from transformers import AutoConfig

    if cfg.model.config_json:
        import json
        from pathlib import Path

        try:
            raw = json.loads(Path(cfg.model.config_json).read_text())
            return AutoConfig.for_model(raw.pop("model_type"), **raw)
        except (OSError, KeyError, ValueError) as err:
            raise ConfigError(f"model.config_json: cannot read a config.json with model_type from "
                              f"{cfg.model.config_json} ({type(err).__name__}: {err})") from None
    from nesta_ray.sources import resolve_model

    return AutoConfig.from_pretrained(resolve_model(cfg.model.source, cfg.model.cache_dir, cfg.model.storage_options))


def dry_run(cfg: JobConfig) -> str:
    """The plan as text: linears by projection with ranks and parameter counts, totals, memory, and with
    ``runtime.workers`` the layer-shard actors with their memory peaks, bytes and time estimates."""
    import torch
    from transformers import AutoModelForCausalLM

    from nesta_ray.pipeline.driver import build_plan, shard_plan, with_ratio
    from nesta_ray.pipeline.plan import Rates, memory_estimate

    auto = cfg.method.auto
    if auto:  # the search picks the ratio at run time; plan (and size) its largest ranks
        cfg = with_ratio(cfg, auto.min_ratio)
    hf_config = _hf_config(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    plan = build_plan(model, cfg)
    by_proj: dict[tuple, list] = defaultdict(list)
    for p in plan.modules:
        by_proj[(p.name.rsplit(".", 1)[-1], p.m, p.n, p.rank, p.k1, p.k2)].append(p)
    per_matrix = cfg.method.k1_tolerance is not None and cfg.method.name.startswith("nsvd")
    rows = [[proj, len(ps), f"{m}x{n}", rank, "by tolerance" if per_matrix else f"{k1}+{k2}", f"{m * n * len(ps):,}",
             f"{rank * (m + n) * len(ps):,}"]
            for (proj, m, n, rank, k1, k2), ps in by_proj.items()]
    dtype_bytes = torch.finfo(getattr(torch, cfg.model.dtype)).bits // 8
    cal = cfg.calibration
    lines = [
        f"model {cfg.model.source} ({hf_config.model_type}, {plan.model_params:,} parameters), method "
        f"{cfg.method.name}, ratio {cfg.method.ratio}" + (f" (auto: the largest of {auto.grid()} keeping {auto.set} "
                                                          f"within +{auto.max_increase:.0%}; planned at the smallest)"
                                                          if auto else "")
        + f", {len(plan.modules)} linears in {len(plan.layers())} layers",
        table(["linear", "count", "shape (out x in)", "rank", "k1+k2", "params before", "params after"], rows),
        f"compressed linears: {plan.params_before:,} -> {plan.params_after:,} parameters "
        f"({1 - plan.params_after / plan.params_before:.1%} removed); whole model: {plan.model_params:,} -> "
        f"{plan.model_params - plan.params_before + plan.params_after:,}",
    ]
    if cfg.runtime.workers:
        rates_src = "runtime.rates" if cfg.runtime.rates else "measured on this machine (1 process)"
        rates = Rates(**(cfg.runtime.rates.model_dump() if cfg.runtime.rates else measure_rates()))
        shards = shard_plan(cfg, plan, hf_config, rates)
        gib = lambda b: f"{b / 2**30:,.1f}"  # noqa: E731
        lines.append(table(["actor", "layers", "weights GiB", "device peak GiB", "host peak GiB", "read GiB",
                            "write GiB", "calibration h", "decomposition h"],
                           [[s["actor"], s["layers"], gib(s["weights_bytes"]), gib(s["device_peak_bytes"]),
                             gib(s["host_peak_bytes"]), gib(s["read_bytes"]), gib(s["write_bytes"]),
                             f"{s['calibration_s'] / 3600:.2f}", f"{s['decomposition_s'] / 3600:.2f}"] for s in shards]))
        if cal.mode == "original":  # micro-batches stream through the shards; the earlier ones fill the pipe
            batches = -(-cal.num_sequences // cal.micro_batch)
            fill = sum(s["calibration_s"] for s in shards[:-1]) / batches
            total = max(s["calibration_s"] for s in shards) + fill + max(s["decomposition_s"] for s in shards)
            how = "micro-batches pipelined through the shards, then each decomposes its own layers"
        else:
            total = sum(s["calibration_s"] + s["decomposition_s"] for s in shards)
            how = "propagate: each shard calibrates and compresses its layers before the next one starts"
        lines.append(f"time estimate: {total / 3600:.2f} h ({how}; rates {rates_src}: matmul {rates.matmul_gflops:,.0f} GFLOP/s, "
                     f"SVD {rates.svd_gflops:,.1f} GFLOP/s, read {rates.read_gbps} GB/s, write {rates.write_gbps} GB/s)")
        lines.append(f"fits: every actor within {cfg.runtime.device_memory_gb} GiB device / "
                     f"{cfg.runtime.host_memory_gb} GiB host memory")
    else:
        mem = memory_estimate(plan, hidden=hf_config.hidden_size, sequences=cal.num_sequences, seq_len=cal.seq_len,
                              micro_batch=cal.micro_batch, intermediate=hf_config.intermediate_size,
                              dtype_bytes=dtype_bytes)
        lines.append(table(["memory", "GiB"], [[k, f"{v / 2**30:.3f}"] for k, v in mem.items()]))
    lines.append(f"output: {cfg.output.uri}/runs/<run id> (then latest)")
    return "\n\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nesta_ray.compress", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML job config (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set method.ratio=0.3 (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--export-dense", action="store_true", help="also write a plain HF folder under dense/")
    args = parser.parse_args(argv)
    overrides = args.set + (["output.export_dense=true"] if args.export_dense else [])
    try:
        cfg = load_config(args.config, overrides)
        if args.dry_run:
            print(dry_run(cfg))
            return 0
        from nesta_ray.pipeline.driver import run_job
        from nesta_ray.report import run_markdown

        report = run_job(cfg)
    except NestaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(run_markdown(report))
    print(f"checkpoint: {report['run_uri']}")
    if not report["published"]:
        print(f"gate {report['gate_summary']}: the run is kept at {report['run_uri']}, latest was not moved",
              file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
