"""Two-stream calibration for the anchored fit: each layer input's statistics from the compressed model's
inputs X̂ paired, token for token, with the dense model's inputs X.

Pure torch, no I/O. Per micro-batch the dense stream runs through the (still dense) layer first and its group
inputs X are held; then the compressed stream runs through the same layer and each group's X̂ is added to its
Gram Ĝ (``GramAccumulator``) and, against the held X, to the cross-Gram C = XᵀX̂ and the dense Gram G = XᵀX
(``CrossGramAccumulator``). Sums as in ``calibration``: one fp32 product per micro-batch on the input's device,
accumulated in fp64 where the accumulator lives. Both runners (the embedded loop, the layer shards) call
``run_two_streams`` so their statistics are bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from nesta_ray.errors import NumericalError
from nesta_ray.method.decompose import InputStats
from nesta_ray.model.calibration import Batch, GramAccumulator


class CrossGramAccumulator:
    """Running XᵀX̂ (n, n) and XᵀX (n, n) over the tokens of one layer input of width n, the dense inputs X and
    the compressed model's X̂ given in matching token order, summed on ``device``."""

    def __init__(self, n: int, device: torch.device | str = "cpu") -> None:
        self.cross_sum = torch.zeros(n, n, dtype=torch.float64, device=device)  # (n, n) Σ x·x̂ᵀ
        self.dense_sum = torch.zeros(n, n, dtype=torch.float64, device=device)  # (n, n) Σ x·xᵀ
        self.tokens = 0

    @property
    def width(self) -> int:
        return self.cross_sum.shape[0]

    def add(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        """Add paired inputs x, x̂ (..., n) of the same tokens. Raises ValueError when their shapes differ."""
        if x.shape != x_hat.shape:
            raise ValueError(f"paired streams differ in shape: dense {tuple(x.shape)}, compressed "
                             f"{tuple(x_hat.shape)}")
        x = x.detach().reshape(-1, self.width).to(torch.float32)  # (T, n)
        x_hat = x_hat.detach().reshape(-1, self.width).to(torch.float32)  # (T, n)
        self.cross_sum.add_((x.T @ x_hat).to(self.cross_sum.device))
        self.dense_sum.add_((x.T @ x).to(self.dense_sum.device))
        self.tokens += x.shape[0]

    def stats(self, compressed: GramAccumulator) -> InputStats:
        """The anchored fit's statistics: Ĝ and mean |x̂| from ``compressed``, C and G from here, all / T.
        Raises NumericalError when no token was seen, the token counts differ or a sum is not finite."""
        if self.tokens == 0 or self.tokens != compressed.tokens:
            raise NumericalError(f"the anchored fit's streams saw {self.tokens} dense and {compressed.tokens} "
                                 "compressed tokens; they must be the same, non-zero")
        for what, total in (("cross-Gram", self.cross_sum), ("dense Gram", self.dense_sum)):
            if not bool(torch.isfinite(total).all()):
                raise NumericalError(f"the {what} accumulated non-finite values; the model overflows on this input")
        own = compressed.stats()
        return InputStats(own.gram, own.abs_mean, own.tokens, cross=self.cross_sum / self.tokens,
                          dense_gram=self.dense_sum / self.tokens)


class _PairedHooks:
    """Forward pre-hooks on one module per input group: in phase "dense" they hold each group's input, in phase
    "compressed" they add the compressed input to the group's Gram and, against the held one, to its cross sums."""

    def __init__(self, modules: Mapping[str, nn.Module], sums_device: torch.device | str) -> None:
        self.modules, self.sums_device = dict(modules), sums_device
        self.phase = "dense"
        self.held: dict[str, torch.Tensor] = {}
        self.grams: dict[str, GramAccumulator] = {}
        self.cross: dict[str, CrossGramAccumulator] = {}

    def __enter__(self) -> _PairedHooks:
        self._handles = [m.register_forward_pre_hook(self._hook(g)) for g, m in self.modules.items()]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def _hook(self, group: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            if self.phase == "dense":
                self.held[group] = x
                return
            n = x.shape[-1]
            self.grams.setdefault(group, GramAccumulator(n, self.sums_device)).add(x)
            self.cross.setdefault(group, CrossGramAccumulator(n, self.sums_device)).add(self.held.pop(group), x)

        return record


def run_two_streams(run: Callable[[torch.Tensor, Any], torch.Tensor], modules: Mapping[str, nn.Module],
                    dense: list[Batch], compressed: list[Batch], sums_device: torch.device | str = "cpu",
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, InputStats]]:
    """Run each micro-batch of both streams through one layer (``run(hidden, kwargs)``), dense first, with
    hooks on ``modules`` (group -> the module whose input is the group's). Returns the dense stream's outputs,
    the compressed stream's outputs (through this same layer) and each hooked group's anchored statistics.
    Raises ValueError when the streams differ in length or shape, NumericalError as ``CrossGramAccumulator``."""
    if len(dense) != len(compressed):
        raise ValueError(f"{len(dense)} dense and {len(compressed)} compressed micro-batches")
    dense_out, compressed_out = [], []
    with torch.no_grad(), _PairedHooks(modules, sums_device) as hooks:
        for (h, kw), (h_hat, kw_hat) in zip(dense, compressed):
            hooks.phase = "dense"
            dense_out.append(run(h, kw))
            hooks.phase = "compressed"
            compressed_out.append(run(h_hat, kw_hat))
    return dense_out, compressed_out, {g: hooks.cross[g].stats(hooks.grams[g]) for g in hooks.grams}
