"""Evaluation: perplexity over non-overlapping windows and greedy generation (the CLI is ``nesta_ray.evaluate``).

Non-finite windows are counted and reported, never dropped silently; the perplexity is then over finite ones.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.nn import functional as F


@dataclass(frozen=True)
class Perplexity:
    """Perplexity of one evaluation set: exp of the mean next-token NLL over the finite windows."""

    name: str
    perplexity: float
    nll: float
    windows: int
    tokens: int
    nonfinite_windows: int

    def as_dict(self) -> dict[str, Any]:
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
def generate(model: torch.nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 24) -> str:
    """Greedy continuation of ``prompt`` (the new text only)."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,  # type: ignore[operator]
                         pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
