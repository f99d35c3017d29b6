"""Work units that Ray runs: plain functions over numpy arrays (zero-copy in Ray's object store), no Ray import."""

from __future__ import annotations

import time

import numpy as np
import torch

from nesta_ray.decompose import decompose_group


def _tensor(a: np.ndarray | None) -> torch.Tensor | None:
    """A writable copy (object-store arrays are read-only), or None."""
    return None if a is None else torch.tensor(a)


def decompose_group_arrays(
    weights: dict[str, np.ndarray], ranks: dict[str, int], method: str, gram: np.ndarray | None,
    abs_mean: np.ndarray | None, k1_fraction: float, damping: float, alpha: float, threads: int,
    k1_tolerance: float | None = None,
) -> dict[str, dict]:
    """Decompose the linears of one input group; factors come back as float32 numpy arrays with their statistics.

    ``threads`` fixes torch's intra-op threads so results are bit-identical whatever the number of workers.
    """
    torch.set_num_threads(threads)
    start = time.perf_counter()
    factors = decompose_group(
        {k: _tensor(v) for k, v in weights.items()}, ranks, method, gram=_tensor(gram), abs_mean=_tensor(abs_mean),
        k1_fraction=k1_fraction, damping=damping, alpha=alpha, k1_tol=k1_tolerance,
    )
    seconds = (time.perf_counter() - start) / max(len(factors), 1)
    return {
        name: {"A": f.A.numpy(), "B": f.B.numpy(), "k1": f.k1, "k2": f.k2, "loss": f.loss,
               "relative_loss": f.relative_loss, "fallbacks": f.fallbacks, "seconds": seconds}
        for name, f in factors.items()
    }
