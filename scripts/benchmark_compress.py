"""Compression benchmark: the default SmolLM2 job (configs/smollm2-135m.yaml: 64 x 512 calibration tokens, nsvd1,
ratio 0.2) run side by side, in one process, with the decomposition and calibration settings before and after
issue 13:

  before      runtime.factorization: svd (LAPACK's full SVDs in both stages), calibration.precision: float32
  gram        runtime.factorization: auto (the short side's Gram eigh in both stages), float32
  gram+bf16   auto, calibration.precision: bfloat16 (autocast forward, bfloat16 inputs to the Gram products)

Per variant: the job's ``compress_total`` (calibration + decomposition), its calibration seconds and the time it
waited for the decomposition after the last layer's calibration (the embedded loop's timings), the decomposition's
own seconds (summed over the linears, nesta.json; it overlaps the calibration), perplexity on the config's
evaluation sets, and per linear the whitened loss
(nesta.json) relative to ``before``: for ``gram`` the same Gram, so the ratio is the factorisation's alone; for
``gram+bf16`` each loss is under its own (bfloat16-input) Gram, so perplexity is the comparison that counts there.
The variants run in the order given, one after another, the 1-minute load average recorded before and after each.

With ``--seeds`` every variant runs once per calibration seed (``calibration.seed``: which 64 windows of the pool
are drawn), and a noise table sets each variant's change against the first variant's beside the first variant's own
spread across seeds: the change a different calibration sample makes. Per evaluation set: the largest |Δ ln ppl|
between the variant and the first at the same seed, against the largest |Δ ln ppl| between two seeds of the first;
per linear: the median |ln(loss ratio)| at the same seed, against the median between seed 0 and each other seed.

    python scripts/benchmark_compress.py                       # results/compress_cpu.{json,md}
    python scripts/benchmark_compress.py --quick               # 16 sequences, 2 evaluation windows per set
    python scripts/benchmark_compress.py --variants before gram
    python scripts/benchmark_compress.py --variants gram gram+bf16 --seeds 0 1 2 --out results/compress_cpu_seeds.json
    python scripts/benchmark_compress.py --render results/compress_cpu_quick.json   # tables again
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from nesta_ray.config.loading import load_config
from nesta_ray.ops.rates_probe import cpu_name
from nesta_ray.pipeline.job import run_job
from nesta_ray.report.markdown import table

VARIANTS = {"before": ["runtime.factorization=svd", "calibration.precision=float32"],
            "gram": ["runtime.factorization=auto", "calibration.precision=float32"],
            "gram+bf16": ["runtime.factorization=auto", "calibration.precision=bfloat16"]}


def run_variant(name: str, seed: int, args: argparse.Namespace, out: Path) -> dict:
    """One job of the variant ``name`` on the calibration windows of ``seed``; its timings, perplexities and
    per-linear losses."""
    sets = [f"evaluation.sets.{i}.num_windows={args.eval_windows}" for i in range(2)] if args.eval_windows else []
    overrides = [*VARIANTS[name], f"output.uri={out / name.replace('+', '_')}_{seed}", "runtime.progress=false",
                 f"calibration.num_sequences={args.sequences}", f"calibration.seed={seed}",
                 "method.allocation=uniform", *sets]  # the loop
    cfg = load_config(args.config, overrides)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    report = run_job(cfg)
    wall = time.perf_counter() - start
    meta = json.loads((Path(report["run_uri"]) / "nesta.json").read_text())
    timings = report.get("timings", {})
    recorded = [o.replace(str(out), "<temp dir>") for o in overrides]  # no path of this machine in the results
    return {"variant": name, "seed": seed, "overrides": recorded, "wall_s": round(wall, 1),
            "compress_total_s": round(timings.get("compress_total", float("nan")), 2),
            "decomposition_s": round(sum(m["seconds"] for m in meta["modules"].values()), 2),
            "timings": {k: round(v, 2) for k, v in timings.items() if isinstance(v, (int, float))},
            "perplexity": report.get("perplexity"), "solvers": meta.get("solvers"),
            "losses": {k: m["loss"] for k, m in meta["modules"].items()},
            "fallbacks": report.get("fallbacks"), "loadavg_1min_before_after": [load_before, os.getloadavg()[0]]}


def _log_ratios(losses: dict[str, float], ref: dict[str, float]) -> list[float]:
    return [math.log(losses[k] / ref[k]) for k in ref if ref[k] > 0 and losses.get(k, 0) > 0]


def ratios(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per variant: the max and mean of its per-linear loss over the first variant's at the same seed, over every
    seed, and how many exceed 1.001."""
    first = rows[0]["variant"]
    refs = {r["seed"]: r["losses"] for r in rows if r["variant"] == first}
    out: dict[str, dict[str, float]] = {}
    for v in dict.fromkeys(r["variant"] for r in rows if r["variant"] != first):
        rel = [math.exp(x) for r in rows if r["variant"] == v for x in _log_ratios(r["losses"], refs[r["seed"]])]
        out[v] = {"max": max(rel), "min": min(rel), "mean": sum(rel) / len(rel),
                  "over_0.1%": sum(x > 1.001 for x in rel), "linears": len(rel)}
    return out


def noise(rows: list[dict]) -> dict[str, dict]:
    """Per variant other than the first: its largest |Δ ln ppl| per evaluation set against the first variant at the
    same seed, and its per-linear median |ln loss ratio|, each beside the first variant's own seed-to-seed value
    (empty with one seed)."""
    first = rows[0]["variant"]
    base = {r["seed"]: r for r in rows if r["variant"] == first}
    if len(base) < 2:
        return {}
    lnp = lambda r, s: math.log(r["perplexity"][s]["compressed"]["perplexity"])  # noqa: E731
    sets = list(rows[0]["perplexity"])
    seeds = sorted(base)
    spread = {s: max(abs(lnp(base[a], s) - lnp(base[b], s)) for a in seeds for b in seeds) for s in sets}
    linear_seed = statistics.median(abs(x) for s in seeds[1:] for x in _log_ratios(base[s]["losses"],
                                                                                    base[seeds[0]]["losses"]))
    out = {}
    for v in dict.fromkeys(r["variant"] for r in rows if r["variant"] != first):
        mine = [r for r in rows if r["variant"] == v and r["seed"] in base]
        change = {s: max(abs(lnp(r, s) - lnp(base[r["seed"]], s)) for r in mine) for s in sets}
        linear = statistics.median(abs(x) for r in mine for x in _log_ratios(r["losses"], base[r["seed"]]["losses"]))
        out[v] = {"seeds": seeds, "ln_ppl_change": change, "ln_ppl_seed_spread": spread,
                  "linear_median_abs_ln_ratio": linear, "linear_seed_median_abs_ln_ratio": linear_seed}
    return out


def markdown(result: dict) -> str:
    """The result's tables: per variant its seconds and perplexities, then the per-linear loss ratios."""
    rows = result["rows"]
    ppl = lambda r: ", ".join(f"{k} {v['compressed']['perplexity']:.2f}" for k, v in (r["perplexity"] or {}).items())  # noqa: E731
    md = [f"CPU: {result.get('cpu', 'not recorded')}, {result.get('cpus')} cores", "",
          table(["variant", "seed", "compress_total s", "calibration s", "decomposition s (sum over linears)",
                 "decomposition wait s", "wall s", "perplexity", "load avg before/after"],
                [[r["variant"], r.get("seed", 0), r["compress_total_s"], r["timings"].get("calibration", ""),
                  r.get("decomposition_s", ""), r["timings"].get("decomposition_wait", ""), r["wall_s"], ppl(r),
                  "/".join(f"{x:.1f}" for x in r["loadavg_1min_before_after"])] for r in rows]), "",
          f"whitened loss per linear over {rows[0]['variant']}'s:", "",
          table(["variant", "linears", "min", "mean", "max", "over +0.1%"],
                [[v, s["linears"], f"{s['min']:.6f}", f"{s['mean']:.6f}", f"{s['max']:.6f}", s["over_0.1%"]]
                 for v, s in result["loss_ratios_vs_first"].items()])]
    for v, n in result.get("noise", {}).items():
        md += ["", f"{v} against {rows[0]['variant']} (same seed) beside {rows[0]['variant']} between calibration "
               f"seeds {n['seeds']}:", "",
               table(["measure", "change", "seed-to-seed", "change / seed-to-seed"],
                     [*[[f"largest Δ ln ppl (abs), {s}", f"{n['ln_ppl_change'][s]:.5f}",
                         f"{n['ln_ppl_seed_spread'][s]:.5f}",
                         f"{n['ln_ppl_change'][s] / n['ln_ppl_seed_spread'][s]:.3f}"] for s in n["ln_ppl_change"]],
                      ["median abs ln loss ratio per linear", f"{n['linear_median_abs_ln_ratio']:.6f}",
                       f"{n['linear_seed_median_abs_ln_ratio']:.6f}",
                       f"{n['linear_median_abs_ln_ratio'] / n['linear_seed_median_abs_ln_ratio']:.3f}"]])]
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/smollm2-135m.yaml")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--sequences", type=int, default=64)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="calibration seeds, each variant once per seed")
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
        for seed in args.seeds:
            for v in args.variants:
                rows.append(run_variant(v, seed, args, Path(tmp)))
                print(json.dumps({k: rows[-1][k] for k in ("variant", "seed", "compress_total_s", "timings",
                                                           "perplexity")}), flush=True)
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "cpu": cpu_name(), "cpus": os.cpu_count(),
              "rows": rows, "loss_ratios_vs_first": ratios(rows), "noise": noise(rows)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
