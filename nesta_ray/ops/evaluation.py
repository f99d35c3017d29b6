"""Evaluation: perplexity over non-overlapping windows and greedy generation (the CLI is ``nesta_ray.evaluate``).

The maths is shared by every way of running a model (in this process or through layer shards): per-window summed
NLL from logits, perplexity from those sums, and greedy decoding over any next-token function. Non-finite windows
are counted and reported, never dropped silently; the perplexity is then over finite ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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


def nll_sums(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL (b,) float64 of windows ``ids`` (b, L) from their logits (b, L, V); inf/NaN where
    the model overflowed."""
    nll = F.cross_entropy(logits.float()[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")  # (b, L-1)
    return nll.double().sum(dim=1)


@torch.no_grad()
def window_nll(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 1) -> torch.Tensor:
    """Summed next-token NLL of each window (W,) for token windows (W, L), ``batch_size`` windows per forward."""
    sums = []
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size]  # (b, L)
        sums.append(nll_sums(model(input_ids=ids, use_cache=False).logits, ids))
    return torch.cat(sums)


def perplexity_of(sums: torch.Tensor, window_len: int, name: str) -> Perplexity:
    """Perplexity of windows of ``window_len`` tokens from their summed NLL (W,). A window whose loss is not
    finite is counted, not used."""
    finite = torch.isfinite(sums)
    per_window = window_len - 1
    used = int(finite.sum())
    nll = float(sums[finite].sum()) / (used * per_window) if used else math.inf
    return Perplexity(name, math.exp(nll) if used else math.inf, nll, sums.shape[0], used * per_window,
                      int((~finite).sum()))


def perplexity(model: torch.nn.Module, windows: torch.Tensor, name: str = "text", batch_size: int = 1) -> Perplexity:
    """Perplexity of ``model`` on token windows (W, L)."""
    return perplexity_of(window_nll(model, windows, batch_size), windows.shape[1], name)


def greedy(next_token: Callable[[torch.Tensor], int], prompt: torch.Tensor, max_new_tokens: int,
           eos: int | None) -> list[int]:
    """Greedy decoding: the new tokens after ``prompt`` (1, t), each the arg-max ``next_token`` returns for the
    sequence so far (recomputed whole, so any way of running the model gives the same tokens), stopping at
    ``eos``."""
    ids, new = prompt, []
    for _ in range(max_new_tokens):
        token = next_token(ids)
        new.append(token)
        if eos is not None and token == eos:
            break
        ids = torch.cat([ids, torch.tensor([[token]], dtype=ids.dtype)], dim=1)
    return new


NextToken = Callable[[torch.Tensor], int]  # a model's arg-max next token after a sequence (1, t)


def model_next_token(model: torch.nn.Module) -> NextToken:
    """The greedy next-token function of a model held in this process."""

    @torch.no_grad()
    def next_token(seq: torch.Tensor) -> int:
        return int(model(input_ids=seq, use_cache=False).logits[0, -1].argmax())

    return next_token


def generate(next_token: NextToken, tokenizer: Any, prompt: str, max_new_tokens: int = 24) -> str:
    """Greedy continuation of ``prompt`` (the new text only) by any next-token function (``model_next_token``,
    or a model run through layer shards)."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    tokens = greedy(next_token, ids, max_new_tokens, tokenizer.eos_token_id)
    return tokenizer.decode(tokens, skip_special_tokens=True)
