"""Architecture map and model surgery: which linears to compress, how inputs group, and the low-rank module.

Every architecture-specific name in nesta_ray lives in ``ARCHITECTURES``. No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from nesta_ray.errors import ModelError


@dataclass(frozen=True)
class ArchSpec:
    """Where a decoder-only family keeps its layers and which linears share an input.

    ``groups`` maps an input-group name to the linears (paths inside one decoder layer) that read that input;
    the first linear of each group carries the statistics hook.
    """

    layers: str
    groups: Mapping[str, tuple[str, ...]]

    def linear_paths(self) -> list[str]:
        return [path for paths in self.groups.values() for path in paths]

    def group_of(self, short_name: str) -> str:
        """Input group of a linear given by its last name component (e.g. "q_proj" -> "attn_in")."""
        for group, paths in self.groups.items():
            if any(p.rsplit(".", 1)[-1] == short_name for p in paths):
                return group
        raise ModelError(f"no linear named {short_name!r} in this architecture; known: {self.short_names()}")

    def short_names(self) -> list[str]:
        return [p.rsplit(".", 1)[-1] for p in self.linear_paths()]


_LLAMA_LIKE = ArchSpec(
    layers="model.layers",
    groups={
        "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "attn_out": ("self_attn.o_proj",),
        "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
        "mlp_out": ("mlp.down_proj",),
    },
)
ARCHITECTURES: dict[str, ArchSpec] = {"llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE}


def arch_for(model_type: str) -> ArchSpec:
    """The ArchSpec of a transformers ``config.model_type``; ModelError naming the supported ones otherwise."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise ModelError(
            f"architecture {model_type!r} is not supported; nesta_ray compresses {', '.join(sorted(ARCHITECTURES))}"
        ) from None


class LowRankLinear(nn.Module):
    """y = (x·Bᵀ)·Aᵀ + bias, a drop-in for nn.Linear(in, out) with A (out, k) and B (k, in)."""

    def __init__(
        self, in_features: int, out_features: int, rank: int, bias: bool = False,
        dtype: torch.dtype | None = None, device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Parameter(torch.empty(out_features, rank, dtype=dtype, device=device))  # (out, k)
        self.B = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))  # (k, in)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None) -> LowRankLinear:
        """Module holding copies of A (out, k), B (k, in) and an optional bias (out,)."""
        module = cls(B.shape[1], A.shape[0], A.shape[1], bias=bias is not None, dtype=A.dtype, device=A.device)
        with torch.no_grad():
            module.A.copy_(A)
            module.B.copy_(B)
            if bias is not None:
                module.bias.copy_(bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.B), self.A, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """A·B (out, in), for export to tools that know no low-rank layers."""
        return self.A @ self.B

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def decoder_layers(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    """The decoder layers of a causal LM (e.g. ``model.model.layers``)."""
    return model.get_submodule(spec.layers)


def layer_linears(layer: nn.Module, spec: ArchSpec, targets: list[str] | None = None) -> dict[str, nn.Module]:
    """Linears of one decoder layer by path (e.g. "self_attn.q_proj"), restricted to ``targets`` short names."""
    wanted = set(targets) if targets is not None else None
    return {
        path: layer.get_submodule(path)
        for path in spec.linear_paths()
        if wanted is None or path.rsplit(".", 1)[-1] in wanted
    }


def group_inputs(layer: nn.Module, spec: ArchSpec) -> dict[str, nn.Module]:
    """One module per input group whose input is that group's input (the group's first linear)."""
    return {group: layer.get_submodule(paths[0]) for group, paths in spec.groups.items()}


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` by ``module``."""
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


class _StopForward(Exception):
    """Raised by a pre-hook to end a forward once the first decoder layer's inputs are captured."""


def capture_layer_inputs(
    model: nn.Module, spec: ArchSpec, input_ids: torch.Tensor
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Hidden states (b, t, d) entering the first decoder layer and the keyword arguments every layer receives.

    Runs only the embedding and the position/mask preparation of the backbone: no decoder layer, no logits.
    """
    layers = decoder_layers(model, spec)
    captured: dict[str, Any] = {}

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model.get_submodule(spec.layers.rsplit(".", 1)[0])(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "hidden" not in captured:
        raise ModelError("the backbone never reached its first decoder layer; is this a decoder-only model?")
    return captured["hidden"], captured["kwargs"]


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: Mapping[str, Any]) -> torch.Tensor:
    """One decoder layer's output hidden states (b, t, d) for input hidden (b, t, d)."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out
