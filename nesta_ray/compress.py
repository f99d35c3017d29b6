"""CLI: ``python -m nesta_ray.compress --config FILE [--set key=value ...] [--dry-run] [--export-dense]``.

Only argument handling lives here; every ``NestaError`` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

os.environ.setdefault("DS_ACCELERATOR", "cpu" if not os.environ.get("CUDA_VISIBLE_DEVICES") else "cuda")

from nesta_ray.config import JobConfig, load_config  # noqa: E402
from nesta_ray.errors import NestaError  # noqa: E402
from nesta_ray.report import table  # noqa: E402


def dry_run(cfg: JobConfig) -> str:
    """The plan as text: linears by projection with ranks and parameter counts, totals and a memory estimate."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from nesta_ray.pipeline.embedded import build_plan
    from nesta_ray.pipeline.plan import memory_estimate
    from nesta_ray.sources import resolve_model

    folder = resolve_model(cfg.model.source, cfg.model.cache_dir, cfg.model.storage_options)
    hf_config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    plan = build_plan(model, cfg)
    by_proj: dict[tuple, list] = defaultdict(list)
    for p in plan.modules:
        by_proj[(p.name.rsplit(".", 1)[-1], p.m, p.n, p.rank, p.k1, p.k2)].append(p)
    rows = [[proj, len(ps), f"{m}x{n}", rank, f"{k1}+{k2}", f"{m * n * len(ps):,}", f"{rank * (m + n) * len(ps):,}"]
            for (proj, m, n, rank, k1, k2), ps in by_proj.items()]
    dtype_bytes = torch.finfo(getattr(torch, cfg.model.dtype)).bits // 8
    mem = memory_estimate(plan, hidden=hf_config.hidden_size, sequences=cfg.calibration.num_sequences,
                          seq_len=cfg.calibration.seq_len, micro_batch=cfg.calibration.micro_batch,
                          intermediate=hf_config.intermediate_size, dtype_bytes=dtype_bytes)
    lines = [
        f"model {cfg.model.source} ({hf_config.model_type}, {plan.model_params:,} parameters), method "
        f"{cfg.method.name}, ratio {cfg.method.ratio}, {len(plan.modules)} linears in {len(plan.layers())} layers",
        table(["linear", "count", "shape (out x in)", "rank", "k1+k2", "params before", "params after"], rows),
        f"compressed linears: {plan.params_before:,} -> {plan.params_after:,} parameters "
        f"({1 - plan.params_after / plan.params_before:.1%} removed); whole model: {plan.model_params:,} -> "
        f"{plan.model_params - plan.params_before + plan.params_after:,}",
        table(["memory", "GiB"], [[k, f"{v / 2**30:.3f}"] for k, v in mem.items()]),
        f"output: {cfg.output.uri}/runs/<run id> (then latest)",
    ]
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
        from nesta_ray.pipeline.embedded import run_job
        from nesta_ray.report import run_markdown

        report = run_job(cfg)
    except NestaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(run_markdown(report))
    print(f"checkpoint: {report['run_uri']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
