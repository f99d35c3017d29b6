"""The CPU twin of scripts/gpu_check.py's rates: measures on this machine every rate the plan uses (the forward's
and the Gram products at the calibration precision, the decomposition's products, Cholesky, eigh, SVD and QR in
float64, storage reads and writes) and writes a rates file that ``runtime.rates`` / ``--rates FILE`` accepts.

The dry-run's own measurement (0.5 s of two products) swings with this machine's load; a rates file measured on an
idle machine does not. The 1-minute load average is recorded in the file.

    python scripts/cpu_rates.py                          # results/rates_cpu.json, about a minute on 2 cores
    python scripts/cpu_rates.py --quick                  # n = 512, 0.2 s budgets: a few seconds
    python -m nesta_ray.compress --config configs/llama70b.yaml --dry-run --rates results/rates_cpu.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from nesta_ray.ops.rates_probe import cpu_name, measure
from nesta_ray.plan.rates import rates_file


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("results/rates_cpu.json"))
    p.add_argument("--precision", choices=["float32", "bfloat16"], default="float32",
                   help="the calibration precision whose forward and Gram products are timed")
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64", help="the decomposition's")
    p.add_argument("--n", type=int, default=1536, help="matrix size (SmolLM2's widest input)")
    p.add_argument("--budget", type=float, default=2.0, help="seconds per rate (at most 5 calls each)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--storage", default=None, help="URI to time storage under (default: a local temp folder)")
    p.add_argument("--quick", action="store_true", help="n = 512, 0.2 s per rate")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.budget = 512, 0.2
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        rates, extra = measure(torch.device("cpu"), args.precision, getattr(torch, args.dtype), args.n,
                               args.budget, args.storage or scratch)
    device = f"CPU {cpu_name()}, {args.threads} threads"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(rates_file(device, rates, extra))
    for name, value in rates.items():
        print(f"{name:16} {value:12,.2f}   {extra['how'][name]}")
    print(f"load average {extra['loadavg_1min']:.2f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
