"""GPU check: what only a GPU machine can verify about the layer shards, in one short run (well under 5 minutes
on one GPU). On a machine without CUDA it runs the CPU parts and marks every GPU part "skipped" with the reason.

On a random 4-layer Llama (hidden 512) saved as safetensors, one shard holding every layer, original mode:
  cpu_layerwise            the CPU reference (layerwise backend)
  gpu_layerwise            layers resident on the GPU, Grams summed in fp64 on the host
  gpu_layerwise_streamed   the same with each layer moved to the GPU per call and back (residency off)
  gpu_deepspeed_cpu        ZeRO-3 inference, parameters offloaded to pinned host memory (pinning recorded)
  gpu_deepspeed_nvme       ZeRO-3 inference, parameters offloaded to NVMe (--nvme-path), when DeepSpeed's async_io
                           op is available (it needs libaio); otherwise skipped with the reason
  cpu_deepspeed            (CPU-only machines) ZeRO-3 on DeepSpeed's CPU accelerator with gloo
  nccl                     the backend DeepSpeed initialised for the shard's world of size 1, and an all_reduce
  ray_placement            compress_sharded with one shard on a local Ray: a GPU bundle when there is a GPU, and
                           the actor's device
  decompose_70b            nsvd1 (ratio 0.2) on seeded synthetic weights and Grams of Llama-3-70B's shapes
                           (8192x8192, 1024x8192, 28672x8192, 8192x28672) on the GPU in float64 and float32 (the
                           job's factorisation): seconds, and the whitened loss relative to float64 (CPU: skipped,
                           its full fp64 factorisations take tens of minutes there)
  rates                    every rate the plan uses, measured on the GPU (nesta_ray/ops/rates_probe.py), written
                           as a rates file to --rates-out for ``--rates FILE`` (default: beside --out)
  cpu_anchored, gpu_anchored   propagate mode with the anchored fit (method.anchored: two streams per layer)
Comparisons: Grams and factors bit-identical between the backends on one device, the max relative difference of
Grams and of A·B between GPU and CPU, and the whitened loss's relative difference per linear. Writes JSON to --out
(default: $OUT/gpu_check.json if $OUT is set, else results/gpu_check.json) and exits 1 if a check failed or a
comparison that must be exact was not.

    python scripts/gpu_check.py [--out PATH] [--nvme-path DIR] [--rates-out PATH] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from nesta_ray.checkpoint.stage import LayerStage
from nesta_ray.io.sources import ModelSource
from nesta_ray.method.decompose import InputStats, Method, decompose
from nesta_ray.method.factorize import Solver
from nesta_ray.method.ranks import rank_for_ratio
from nesta_ray.model.arch import arch_for
from nesta_ray.pipeline import backends
from nesta_ray.pipeline.backends import BackendSpec, ShardPart
from nesta_ray.pipeline.shard_worker import LayerShard, ShardOptions
from nesta_ray.pipeline.tasks import Work
from nesta_ray.plan.linears import make_plan
from nesta_ray.plan.rates import rates_file

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHOD = Method("nsvd1", k1_tolerance=None)
ANCHORED = Method("nsvd1", k1_tolerance=None, anchored=True)
THREADS = max(1, min(4, (os.cpu_count() or 2) // 2))
LAYERS = 4
SHAPES_70B = [(8192, 8192), (1024, 8192), (28672, 8192), (8192, 28672)]


def tiny_folder(folder: Path) -> str:
    """A random Llama (hidden 512, MLP 1376, GQA 8:2, 4 layers) as a safetensors folder; no tokenizer needed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=LAYERS, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=4096, max_position_embeddings=512)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


def run_shard(folder: str, plan, ids: torch.Tensor, scratch: Path, name: str, spec: BackendSpec,
              device: str) -> dict:
    """One shard over every layer: Grams (fp64 sums), factors and timings, with the backend ``spec`` on ``device``."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    stage = LayerStage(str(scratch / name), "check")
    shard = LayerShard(ModelSource(folder, folder), ShardPart(list(range(LAYERS)), first=True, last=True),
                       Work(plan, METHOD, micro_batch=2, threads=THREADS), stage, ShardOptions(backend=spec),
                       device=device)
    extra = {}
    if spec.name == "deepspeed":
        param = shard.backend.layer(0).self_attn.q_proj.weight
        pinned = bool(param.ds_tensor.is_pinned()) if device == "cuda" else None
        extra["offloaded_partition"] = {"device": str(param.ds_tensor.device), "pinned": pinned,
                                        "visible_shape": list(param.shape)}
    if spec.name == "layerwise":
        extra["resident"] = shard.backend.resident
    inputs = [shard.embed(ids[s : s + 2].numpy()) for s in range(0, ids.shape[0], 2)]
    for b, batch in enumerate(inputs):
        shard.forward(b, batch)
    grams = {f"{i}.{g}": acc.gram_sum.clone() for i, accs in shard.grams.items() for g, acc in accs.items()}
    summary = shard.decompose(*inputs)
    shard.close()
    staged = {k: v for i in range(LAYERS) for k, v in stage.get(i).items()}
    return {"grams": grams, "factors": {k: (v.A, v.B) for k, v in staged.items()},
            "losses": {k: v.loss for k, v in staged.items()},
            "report": {"status": "ok", "device": summary["device"], "seconds": round(time.perf_counter() - start, 2),
                       "peak_device_bytes": summary["peak_device_bytes"], **extra}}


def run_anchored(folder: str, plan, ids: torch.Tensor, scratch: Path, name: str, device: str) -> dict:
    """One shard over every layer in propagate mode with the anchored fit (two streams, cross-Grams on the
    device, summed in fp64 on the host): its factors and seconds."""
    start = time.perf_counter()
    stage = LayerStage(str(scratch / name), "check")
    shard = LayerShard(ModelSource(folder, folder), ShardPart(list(range(LAYERS)), first=True, last=True),
                       Work(plan, ANCHORED, micro_batch=2, threads=THREADS, mode="propagate"), stage,
                       ShardOptions(backend=BackendSpec()), device=device)
    inputs = [shard.embed(ids[s : s + 2].numpy()) for s in range(0, ids.shape[0], 2)]
    out = shard.calibrate(*inputs)
    summary = shard.decompose(*inputs)
    shard.close()
    staged = {k: v for i in range(LAYERS) for k, v in stage.get(i).items()}
    return {"grams": {}, "factors": {k: (v.A, v.B) for k, v in staged.items()},
            "report": {"status": "ok", "device": summary["device"], "seconds": round(time.perf_counter() - start, 2),
                       "streams_shape": list(out[0][0].shape)}}


def compare(a: dict, b: dict) -> dict:
    """Bit-equality of Grams (when ``a`` has them) and factors, and max relative differences (Grams; A·B, which
    is free of the factors' sign choices)."""
    prod_rel = 0.0
    for k, (A, B) in b["factors"].items():
        ref = A.double() @ B.double()
        got = a["factors"][k][0].double() @ a["factors"][k][1].double()
        prod_rel = max(prod_rel, float((got - ref).abs().max() / ref.abs().max()))
    out = {"factors_identical": all(torch.equal(a["factors"][k][0], b["factors"][k][0])
                                    and torch.equal(a["factors"][k][1], b["factors"][k][1]) for k in b["factors"]),
           "AB_max_rel_diff": prod_rel, "grams_identical": None, "grams_max_rel_diff": None,
           "loss_rel_diff": {k: a["losses"][k] / b["losses"][k] - 1 if b["losses"][k] else 0.0 for k in b["losses"]}}
    if a["grams"]:
        out["grams_identical"] = all(torch.equal(a["grams"][k], b["grams"][k]) for k in b["grams"])
        out["grams_max_rel_diff"] = max(float((a["grams"][k] - b["grams"][k]).abs().max() / b["grams"][k].abs().max())
                                        for k in b["grams"])
    return out


def decompose_70b(shapes: list[tuple[int, int]]) -> dict:
    """Each 70B shape decomposed on the GPU in float64 and float32 (seeded synthetic weight and Gram)."""
    rows = []
    for m, n in shapes:
        g = torch.Generator().manual_seed(m + n)
        W = torch.randn(m, n, generator=g) * torch.logspace(0, -1, n) / n**0.5
        Z = torch.randn(n, 64, generator=g, dtype=torch.float64)
        G = torch.diag(torch.logspace(0, -3, n, dtype=torch.float64)) + Z @ Z.T / 64
        rank, stats, out = rank_for_ratio(m, n, 0.2), InputStats(G.cuda(), None, 1), {}
        for dtype in ("float64", "float32"):
            torch.cuda.synchronize()
            start = time.perf_counter()
            f = decompose(W, Method("nsvd1", k1_tolerance=0.02), rank, stats, solver=Solver("cuda", dtype))
            torch.cuda.synchronize()
            out[dtype] = {"seconds": round(time.perf_counter() - start, 3), "loss": f.loss, "k2": f.k2,
                          "solver": f.solver, "fallbacks": {k: v for k, v in f.fallbacks.items() if v}}
        out["float32"]["loss_vs_float64"] = out["float32"]["loss"] / out["float64"]["loss"] - 1
        rows.append({"shape": [m, n], "rank": rank, **out})
        print("decompose_70b", json.dumps(rows[-1])[:300], flush=True)
    return {"report": {"status": "ok", "rows": rows}}


def measured_rates(out: Path) -> dict:
    """The GPU's rates file (nesta_ray/ops/rates_probe.py), n = 8192 like Llama-3-70B's hidden size."""
    from nesta_ray.ops.rates_probe import measure

    with tempfile.TemporaryDirectory() as scratch:
        rates, extra = measure(torch.device("cuda"), "bfloat16", torch.float64, 8192, 2.0, scratch)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(rates_file(torch.cuda.get_device_name(0), rates, extra))
    return {"report": {"status": "ok", "file": str(out), "rates": rates}}


def nvme_available() -> tuple[bool, str]:
    from deepspeed.ops.op_builder import AsyncIOBuilder

    ok = AsyncIOBuilder().is_compatible(verbose=False)
    return ok, "" if ok else "DeepSpeed's async_io op is not compatible here (libaio-dev missing?)"


def ray_placement(folder: str, plan, ids: torch.Tensor, scratch: Path, cuda: bool) -> dict:
    """compress_sharded with one shard on a local Ray that has the GPU: the actor's device and factors."""
    import ray

    from nesta_ray.pipeline.shard_group import compress_sharded

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=2, num_gpus=1 if cuda else 0, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(scratch / "ray"))
    try:
        stage = LayerStage(str(scratch / "ray-stage"), "check")
        work = Work(plan, METHOD, micro_batch=2, threads=THREADS)
        out = compress_sharded(ModelSource(folder, folder), ids, work, stage, 1)
    finally:
        ray.shutdown()
    staged = {k: v for i in range(LAYERS) for k, v in stage.get(i).items()}
    return {"factors": {k: (v.A, v.B) for k, v in staged.items()}, "grams": {},
            "losses": {k: v.loss for k, v in staged.items()},
            "report": {"status": "ok", "device": out["actors"][0]["device"], "gpu_bundle": cuda,
                       "peak_device_bytes": out["actors"][0]["peak_device_bytes"]}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path("results")
    p.add_argument("--out", type=Path, default=out_dir / "gpu_check.json")
    p.add_argument("--nvme-path", default=None, help="folder for the NVMe offload check (default: a temp folder)")
    p.add_argument("--rates-out", type=Path, default=None, help="the measured rates file (default: beside --out)")
    p.add_argument("--quick", action="store_true", help="decompose_70b on the two smaller shapes only")
    args = p.parse_args(argv)
    rates_out = args.rates_out or args.out.with_name("rates_" + (torch.cuda.get_device_name(0).replace(" ", "_")
                                                                 if torch.cuda.is_available() else "cpu") + ".json")
    cuda = torch.cuda.is_available()
    report: dict = {"torch": torch.__version__, "cuda": cuda,
                    "gpu": torch.cuda.get_device_name(0) if cuda else None, "checks": {}, "comparisons": {}}
    skip = {"status": "skipped", "reason": "no CUDA device"}
    runs: dict[str, dict] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        folder = tiny_folder(scratch / "model")
        with torch.device("meta"):
            from transformers import AutoConfig, AutoModelForCausalLM

            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
        plan = make_plan(skeleton, arch_for("llama"), method=METHOD, ratio=0.3, targets=TARGETS)
        ids = torch.randint(0, 4096, (8, 128), generator=torch.Generator().manual_seed(0))

        def attempt(name: str, fn) -> None:
            try:
                runs[name] = fn()
                report["checks"][name] = runs[name]["report"]
            except Exception as err:  # a GPU check script reports every failure and goes on
                report["checks"][name] = {"status": "failed", "error": f"{type(err).__name__}: {err}",
                                          "trace": traceback.format_exc()[-2000:]}
            print(name, json.dumps(report["checks"][name])[:300], flush=True)

        attempt("cpu_layerwise", lambda: run_shard(folder, plan, ids, scratch, "cpu-lw", BackendSpec(), "cpu"))
        attempt("cpu_anchored", lambda: run_anchored(folder, plan, ids, scratch, "cpu-an", "cpu"))
        if cuda:
            attempt("gpu_anchored", lambda: run_anchored(folder, plan, ids, scratch, "gpu-an", "cuda"))
        else:
            report["checks"]["gpu_anchored"] = skip
        if cuda:
            attempt("gpu_layerwise", lambda: run_shard(folder, plan, ids, scratch, "gpu-lw", BackendSpec(), "cuda"))
            resident = backends.RESIDENT_FRACTION
            backends.RESIDENT_FRACTION = 0.0  # force the per-call move to the device and back
            attempt("gpu_layerwise_streamed",
                    lambda: run_shard(folder, plan, ids, scratch, "gpu-lws", BackendSpec(), "cuda"))
            backends.RESIDENT_FRACTION = resident
            attempt("gpu_deepspeed_cpu", lambda: run_shard(folder, plan, ids, scratch, "gpu-ds",
                                                           BackendSpec("deepspeed", "cpu"), "cuda"))
            ok, why = nvme_available()
            nvme = args.nvme_path or str(scratch / "nvme")
            if ok:
                attempt("gpu_deepspeed_nvme", lambda: run_shard(folder, plan, ids, scratch, "gpu-dsn",
                                                                BackendSpec("deepspeed", "nvme", nvme), "cuda"))
            else:
                report["checks"]["gpu_deepspeed_nvme"] = {"status": "skipped", "reason": why}
        else:
            for name in ("gpu_layerwise", "gpu_layerwise_streamed", "gpu_deepspeed_cpu", "gpu_deepspeed_nvme"):
                report["checks"][name] = skip
            attempt("cpu_deepspeed", lambda: run_shard(folder, plan, ids, scratch, "cpu-ds",
                                                       BackendSpec("deepspeed", "cpu"), "cpu"))
        report["checks"]["nccl"] = nccl_check() if cuda else skip
        if cuda:
            attempt("decompose_70b", lambda: decompose_70b(SHAPES_70B[:2] if args.quick else SHAPES_70B))
            attempt("rates", lambda: measured_rates(rates_out))
        else:
            report["checks"]["decompose_70b"] = {"status": "skipped", "reason": "no CUDA device (on this CPU the "
                                                 "full fp64 factorisations take tens of minutes: see "
                                                 "scripts/benchmark_factorize.py)"}
            report["checks"]["rates"] = {"status": "skipped", "reason": "no CUDA device: scripts/cpu_rates.py"}
        attempt("ray_placement", lambda: ray_placement(folder, plan, ids, scratch, cuda))

    must_match = [("gpu_layerwise_streamed", "gpu_layerwise"), ("gpu_deepspeed_cpu", "gpu_layerwise"),
                  ("gpu_deepspeed_nvme", "gpu_layerwise"), ("cpu_deepspeed", "cpu_layerwise"),
                  ("ray_placement", "gpu_layerwise" if cuda else "cpu_layerwise")]
    failed = [n for n, c in report["checks"].items() if c.get("status") == "failed"]
    for a, b in must_match + [("gpu_layerwise", "cpu_layerwise"), ("gpu_anchored", "cpu_anchored")]:
        if a in runs and b in runs:
            c = compare(runs[a], runs[b])
            report["comparisons"][f"{a} vs {b}"] = c
            exact = (a, b) in must_match
            if exact and not (c["factors_identical"] and c["grams_identical"] in (True, None)):
                failed.append(f"{a} vs {b}")
    report["failed"] = failed
    report["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"comparisons": report["comparisons"], "failed": failed, "seconds": report["seconds"]}, indent=2))
    return 1 if failed else 0


def nccl_check() -> dict:
    """The backend DeepSpeed initialised for the shard's world of size 1, and an all_reduce through it."""
    import torch.distributed as dist

    try:
        if not dist.is_initialized():
            backends.init_world(torch.device("cuda"))
        t = torch.full((4,), 2.0, device="cuda")
        dist.all_reduce(t)
        return {"status": "ok", "backend": dist.get_backend(), "world_size": dist.get_world_size(),
                "all_reduce": t.tolist()}
    except Exception as err:
        return {"status": "failed", "error": f"{type(err).__name__}: {err}"}


if __name__ == "__main__":
    sys.exit(main())
