"""Compression benchmark: the default SmolLM2 job (configs/smollm2-135m.yaml: 64 x 512 calibration tokens, nsvd1,
ratio 0.2) run side by side, in one process, with the decomposition and calibration settings before and after
issue 13:

  before      runtime.factorization: svd (LAPACK's full SVDs in both stages), calibration.precision: float32
  gram        runtime.factorization: auto (the short side's Gram eigh in both stages), float32
  gram+bf16   auto, calibration.precision: bfloat16 (autocast forward, bfloat16 inputs to the Gram products)

Per variant: the job's ``compress_total`` (calibration + decomposition), its calibration and decomposition seconds
(the embedded loop's timings), perplexity on the config's evaluation sets, and per linear the whitened loss
(nesta.json) relative to ``before``: for ``gram`` the same Gram, so the ratio is the factorisation's alone; for
``gram+bf16`` each loss is under its own (bfloat16-input) Gram, so perplexity is the comparison that counts there.
The variants run in the order given, one after another, the 1-minute load average recorded before and after each.

    python scripts/benchmark_compress.py                       # results/compress_cpu.{json,md}
    python scripts/benchmark_compress.py --quick               # 16 sequences, 2 evaluation windows per set
    python scripts/benchmark_compress.py --variants before gram
    python scripts/benchmark_compress.py --render results/compress_cpu_quick.json   # tables again
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from nesta_ray.config.loading import load_config
from nesta_ray.pipeline.job import run_job
from nesta_ray.report.markdown import table

VARIANTS = {"before": ["runtime.factorization=svd", "calibration.precision=float32"],
            "gram": ["runtime.factorization=auto", "calibration.precision=float32"],
            "gram+bf16": ["runtime.factorization=auto", "calibration.precision=bfloat16"]}


def run_variant(name: str, args: argparse.Namespace, out: Path) -> dict:
    """One job of the variant ``name``; its timings, perplexities and per-linear losses."""
    sets = [f"evaluation.sets.{i}.num_windows={args.eval_windows}" for i in range(2)] if args.eval_windows else []
    overrides = [*VARIANTS[name], f"output.uri={out / name.replace('+', '_')}", "runtime.progress=false",
                 f"calibration.num_sequences={args.sequences}", "method.allocation=uniform", *sets]  # the loop
    cfg = load_config(args.config, overrides)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    report = run_job(cfg)
    wall = time.perf_counter() - start
    meta = json.loads((Path(report["run_uri"]) / "nesta.json").read_text())
    timings = report.get("timings", {})
    return {"variant": name, "overrides": overrides, "wall_s": round(wall, 1),
            "compress_total_s": round(timings.get("compress_total", float("nan")), 2),
            "timings": {k: round(v, 2) for k, v in timings.items() if isinstance(v, (int, float))},
            "perplexity": report.get("perplexity"), "solvers": meta.get("solvers"),
            "losses": {k: m["loss"] for k, m in meta["modules"].items()},
            "fallbacks": report.get("fallbacks"), "loadavg_1min_before_after": [load_before, os.getloadavg()[0]]}


def ratios(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per variant: the max and mean of its per-linear loss over the first variant's, and how many exceed 1.001."""
    ref = rows[0]["losses"]
    out = {}
    for r in rows[1:]:
        rel = [r["losses"][k] / ref[k] for k in ref if ref[k] > 0]
        out[r["variant"]] = {"max": max(rel), "min": min(rel), "mean": sum(rel) / len(rel),
                             "over_0.1%": sum(x > 1.001 for x in rel), "linears": len(rel)}
    return out


def markdown(result: dict) -> str:
    """The result's tables: per variant its seconds and perplexities, then the per-linear loss ratios."""
    rows = result["rows"]
    ppl = lambda r: ", ".join(f"{k} {v['compressed']['perplexity']:.2f}" for k, v in (r["perplexity"] or {}).items())  # noqa: E731
    md = [table(["variant", "compress_total s", "calibration s", "decomposition wait s", "wall s", "perplexity",
                 "load avg before/after"],
                [[r["variant"], r["compress_total_s"], r["timings"].get("calibration", ""),
                  r["timings"].get("decomposition_wait", ""), r["wall_s"], ppl(r),
                  "/".join(f"{x:.1f}" for x in r["loadavg_1min_before_after"])] for r in rows]), "",
          f"whitened loss per linear over {rows[0]['variant']}'s:", "",
          table(["variant", "linears", "min", "mean", "max", "over +0.1%"],
                [[v, s["linears"], f"{s['min']:.6f}", f"{s['mean']:.6f}", f"{s['max']:.6f}", s["over_0.1%"]]
                 for v, s in result["loss_ratios_vs_first"].items()])]
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/smollm2-135m.yaml")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--sequences", type=int, default=64)
    p.add_argument("--eval-windows", type=int, default=0, help="windows per evaluation set (0: the config's)")
    p.add_argument("--quick", action="store_true", help="16 sequences, 2 evaluation windows per set")
    p.add_argument("--out", type=Path, default=Path("results/compress_cpu.json"))
    p.add_argument("--render", type=Path, default=None, help="write the tables of this result JSON beside it, exit")
    args = p.parse_args(argv)
    if args.render:
        args.render.with_suffix(".md").write_text(markdown(json.loads(args.render.read_text())))
        return 0
    if args.quick:
        args.sequences, args.eval_windows = 16, 2
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for v in args.variants:
            rows.append(run_variant(v, args, Path(tmp)))
            print(json.dumps({k: rows[-1][k] for k in ("variant", "compress_total_s", "timings", "perplexity")}),
                  flush=True)
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "cpus": os.cpu_count(), "rows": rows,
              "loss_ratios_vs_first": ratios(rows)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
