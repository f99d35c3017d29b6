"""The measured sensitivity of each linear: projections p_i = Σ_t (g_tᵀ·u_i)² of the loss gradient g at the
linear's output onto the left singular vectors u_i of its whitened weight, from one backward pass of the summed
next-token loss of calibration windows (``method.allocation`` turns them into loss curves).

Pure torch, no I/O. The backward runs one decoder layer at a time from that layer's stored input (recomputed
with autograd on, then dropped), so a runner that holds only some layers (a layer shard,
``pipeline.shard_worker.LayerShard.backward``) computes exactly what the whole model in one process computes:
the layer inputs of a micro-batch come from a no-grad forward, the head's gradient from ``head_gradient`` (token
chunks, so a 262k-word head never holds all logits at once) and each layer's input gradient from
``layer_backward``. Products are fp32 on the gradient's device, sums fp64 where the accumulator lives. In one
process, micro-batches may run side by side in threads (each its own sums, folded in micro-batch order afterwards),
which gives the sequential pass's sums bit for bit.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from nesta_ray.model.arch import ArchSpec
from nesta_ray.model.layers import capture_layer_inputs, decoder_layers, head_logits, run_layer

HEAD_CHUNK_TOKENS = 256  # tokens per head chunk: logits (chunk, V) at a time (Gemma-3: 268 MB in fp32)


class ComponentFisher:
    """Running Σ_t (g_tᵀ·u_i)² (r,) for the columns u_i of U (m, r) over the output gradients g (…, m) of one
    linear; U is kept in fp32 on ``device`` (where the gradients arrive), the sums in fp64 on the host."""

    def __init__(self, U: torch.Tensor, device: torch.device | str = "cpu") -> None:
        self.U = U.detach().to(device=device, dtype=torch.float32)  # (m, r)
        self.sums = torch.zeros(U.shape[1], dtype=torch.float64)  # (r,)
        self.tokens = 0

    def add(self, g: torch.Tensor) -> None:
        """Add output gradients g (…, m)."""
        proj = g.detach().reshape(-1, self.U.shape[0]).to(torch.float32) @ self.U  # (T, r)
        self.sums.add_((proj.double() ** 2).sum(dim=0).cpu())
        self.tokens += proj.shape[0]

    def empty(self) -> ComponentFisher:
        """An accumulator on the same directions (U shared, not copied) with nothing added yet."""
        return ComponentFisher(self.U, self.U.device)

    def fold(self, other: ComponentFisher) -> None:
        """Add the sums and tokens of ``other`` (an ``empty()`` of this one that saw other gradients)."""
        self.sums.add_(other.sums)
        self.tokens += other.tokens


Fishers = Mapping[str, ComponentFisher]


@contextmanager
def gradient_hooks(linears: Mapping[str, nn.Module], fishers: Fishers | Callable[[], Fishers]) -> Iterator[None]:
    """Inside, every output gradient of ``linears`` (name -> module) that autograd computes is added to the
    ``fishers`` accumulator of the same name; a callable ``fishers`` is asked at each forward which accumulators
    that forward's gradients go to (the calling thread's)."""
    sinks = fishers if callable(fishers) else lambda: fishers

    def hook_for(name: str) -> Callable[[nn.Module, tuple[Any, ...], torch.Tensor], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            if out.requires_grad:
                out.register_hook(sinks()[name].add)

        return hook

    handles = [m.register_forward_hook(hook_for(name)) for name, m in linears.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def layer_backward(run: Callable[[torch.Tensor, Any], torch.Tensor], hidden: torch.Tensor, kwargs: Any,
                   grad_out: torch.Tensor) -> torch.Tensor:
    """The gradient (b, t, d) at one layer's input ``hidden`` (b, t, d), given the gradient at its output
    ``grad_out`` (b, t, d): the layer's forward ``run(hidden, kwargs)`` recomputed with autograd on. Only input
    gradients are formed (no parameter gradient is accumulated)."""
    h = hidden.detach().requires_grad_(True)
    with torch.enable_grad():
        out = run(h, kwargs)
        (grad,) = torch.autograd.grad(out, h, grad_out)
    return grad


def head_gradient(logits_of: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                  ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The gradient (b, t, d) of the summed next-token NLL of windows ``ids`` (b, t) at the last layer's outputs
    ``hidden`` (b, t, d), and that NLL; ``logits_of`` maps hidden states (b, c, d) to logits (b, c, V) token by
    token (final norm, head, soft-capping), so chunks of positions are exact."""
    b, t, _ = hidden.shape
    grad = torch.zeros_like(hidden)
    total = 0.0
    step = max(1, HEAD_CHUNK_TOKENS // b)
    for s in range(0, t - 1, step):
        e = min(s + step, t - 1)  # position t − 1 predicts nothing
        h = hidden[:, s:e].detach().requires_grad_(True)
        with torch.enable_grad():
            logits = logits_of(h).float()  # (b, e − s, V)
            loss = F.cross_entropy(logits.transpose(1, 2), ids[:, s + 1 : e + 1].to(logits.device), reduction="sum")
            (g,) = torch.autograd.grad(loss, h)
        grad[:, s:e] = g
        total += float(loss.detach())
    return grad, total


def backward_layers(runs: Sequence[Callable[[torch.Tensor, Any], torch.Tensor]], inputs: list[torch.Tensor],
                    kwargs: Any, grad_out: torch.Tensor,
                    hooks: Callable[[int], AbstractContextManager[Any]] = lambda k: nullcontext()) -> torch.Tensor:
    """Back through consecutive layers (``runs[k]``, with stored inputs ``inputs[k]`` (b, t, d)) from the
    gradient ``grad_out`` at the last one's output, the context ``hooks(k)`` (its ``gradient_hooks``) active during
    layer k's backward. Returns the gradient at the first layer's input."""
    grad = grad_out
    for k in range(len(runs) - 1, -1, -1):
        with hooks(k):
            grad = layer_backward(runs[k], inputs[k], kwargs, grad)
    return grad


def forward_inputs(runs: Sequence[Callable[[torch.Tensor, Any], torch.Tensor]], hidden: torch.Tensor,
                   kwargs: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each layer's input (b, t, d) and the last layer's output, by a no-grad forward through ``runs``."""
    inputs = []
    with torch.no_grad():
        for run in runs:
            inputs.append(hidden)
            hidden = run(hidden, kwargs)
    return inputs, hidden


def _runner(layer: nn.Module) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    return lambda hidden, kwargs: run_layer(layer, hidden, kwargs)


def collect_projections(model: nn.Module, spec: ArchSpec, ids: torch.Tensor, micro_batch: int,
                        linears: Mapping[int, Mapping[str, nn.Module]], fishers: Fishers, workers: int = 1) -> float:
    """One backward pass of the summed next-token NLL of token windows ``ids`` (N, L) through the whole model in
    this process, ``micro_batch`` windows at a time (``workers`` of them side by side in threads), adding the output
    gradients of ``linears`` (layer -> name -> module) to ``fishers``. The sums equal a one-worker pass bit for bit
    at any ``workers``. Returns the summed NLL."""
    layers = decoder_layers(model, spec)
    first = min(linears, default=len(layers))  # no layer below it needs a backward
    runs = [_runner(layer) for layer in layers]
    batches = [ids[s : s + micro_batch] for s in range(0, ids.shape[0], micro_batch)]  # (b, L) each
    with torch.no_grad():  # the embedding, here: it swaps the model's layers while it runs
        captured = [capture_layer_inputs(model, spec, batch) for batch in batches]
    local = threading.local()

    def one(k: int) -> tuple[float, dict[str, ComponentFisher]]:
        local.sinks = {name: f.empty() for name, f in fishers.items()}
        hidden, kwargs = captured[k]
        inputs, out = forward_inputs(runs, hidden, kwargs)
        grad, nll = head_gradient(lambda h: head_logits(model, spec, h), out, batches[k])
        backward_layers(runs[first:], inputs[first:], kwargs, grad)
        return nll, local.sinks

    hooked = {name: m for group in linears.values() for name, m in group.items()}
    with gradient_hooks(hooked, lambda: local.sinks), ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(pool.map(one, range(len(batches))))
    total = 0.0
    for nll, sinks in results:  # in micro-batch order, as a sequential pass adds them
        total += nll
        for name, f in sinks.items():
            fishers[name].fold(f)
    return total
