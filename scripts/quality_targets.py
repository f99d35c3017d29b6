"""Issue 14's targets, one row per explore_quality result row against asvd1 of the same (model, seed, calibration
windows, evaluation windows, ratio): c4_heldout perplexity >= 20% lower, the mean log-perplexity of the five
off-domain sets >= 0.15 nats lower and of the three English-script sets (Wikipedia, instructions, code) >= 0.10
lower, at 10% and 20%; at 30% no worse on any.

    python scripts/quality_targets.py results/explore14_*.json
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from nesta_ray.report.markdown import table

from benchmark_quality import CALIBRATION_SET, mean_other_nll

ENGLISH_SCRIPT = ("en_wikipedia", "en_instruct", "code")  # issue 14's second off-domain bar


def targets(paths: list[str]) -> str:
    """The targets table (module docstring) over the result files ``paths``."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    key = lambda d: (d["model_folder"], d["args"]["seed"], d["args"].get("mix", "en"),  # noqa: E731
                     d["args"]["calib_windows"], d["args"]["eval_windows"])
    base = {(key(d), r["ratio"]): r["nll"] for d in runs for r in d["rows"] if r["variant"] == "asvd1"}
    en = lambda nll: sum(nll[n] for n in ENGLISH_SCRIPT) / len(ENGLISH_SCRIPT)  # noqa: E731
    body = []
    for d in runs:
        for r in d["rows"]:
            b = base.get((key(d), r["ratio"]))
            if b is None or r["variant"] in ("asvd1", "dense"):
                continue
            c4 = math.exp(r["nll"][CALIBRATION_SET] - b[CALIBRATION_SET])
            d5, d3 = mean_other_nll(r["nll"]) - mean_other_nll(b), en(r["nll"]) - en(b)
            far = r["ratio"] < 0.25
            met = [c4 <= 0.8 if far else c4 <= 1.0, d5 <= -0.15 if far else d5 <= 0, d3 <= -0.10 if far else d3 <= 0]
            body.append([d["model_folder"].split("-")[0], str(d["args"]["seed"]), str(d["args"]["calib_windows"]),
                         f"{r['ratio']:.0%}", r["variant"], f"{c4:.4f}", f"{d5:+.4f}", f"{d3:+.4f}",
                         " ".join("✓" if m else "✗" for m in met)])
    return table(["model", "seed", "calib windows", "ratio", "variant", "c4 ppl / asvd1", "Δ5 nats", "Δ3 (en) nats",
                  "targets c4 / 5 / 3"], body)


if __name__ == "__main__":
    print(targets(sys.argv[1:]))
