"""Architecture map and model surgery: which linears to compress, how inputs group, and the low-rank module.

Every architecture-specific name in nesta_ray lives in ``ARCHITECTURES``. No I/O here.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from nesta_ray.errors import ModelError


@dataclass(frozen=True)
class ArchSpec:
    """Where a decoder-only family keeps its layers and which linears share an input.

    ``groups`` maps an input-group name to the linears (paths inside one decoder layer) that read that input;
    the first linear of each group carries the statistics hook. ``stem`` names the backbone modules with stored
    weights that the first decoder layer's inputs need (the token embedding). ``layer_type`` is the attribute
    path, inside a decoder layer, of its attention type when layers of one model take different masks or
    position embeddings (Gemma-3's sliding and global layers); None when all layers take the same.
    """

    layers: str
    groups: Mapping[str, tuple[str, ...]]
    stem: tuple[str, ...] = ("embed_tokens",)
    layer_type: str | None = None

    @property
    def backbone(self) -> str:
        """Path of the module that holds the decoder layers (e.g. "model")."""
        return self.layers.rsplit(".", 1)[0]

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


_LLAMA_GROUPS = {
    "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn_out": ("self_attn.o_proj",),
    "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp_out": ("mlp.down_proj",),
}
_LLAMA_LIKE = ArchSpec(layers="model.layers", groups=_LLAMA_GROUPS)
# Gemma-3 (text) and Qwen2 may mix sliding-window and global attention layers, each with its own mask (and, in
# Gemma-3, its own rotary frequencies); their attention modules name their type.
_TYPED_LAYERS = ArchSpec(layers="model.layers", groups=_LLAMA_GROUPS, layer_type="self_attn.layer_type")
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _TYPED_LAYERS, "gemma3_text": _TYPED_LAYERS,
}


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


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Inside, every parameter a module registers moves to the meta device; buffers stay where they were made, so
    buffers computed at construction (rotary frequencies, Gemma's embedding scale), which checkpoints never store,
    keep their values. Fill a submodule's parameters afterwards with ``materialise``."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def materialise(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Give a submodule built under ``parameters_on_meta`` its stored tensors (keys relative to it), cast to the
    module's dtypes. Computed buffers are left as they are. Raises ModelError naming missing or unexpected keys.
    """
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelError(f"weights do not match {type(module).__name__}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    module.load_state_dict({k: state[k].to(expected[k].dtype) for k in expected}, assign=True)


# What capture_layer_inputs returns for run_layer: {"type_attr": ArchSpec.layer_type, "by_type": {layer type (None
# when the architecture has one): the kwargs those layers receive}}. Plain containers only, so it pickles between
# Ray processes and any walker of dicts/tuples (moving tensors to a device) keeps its shape.
LayerKwargs = dict[str, Any]


def kwargs_for(layer: nn.Module, kwargs: LayerKwargs) -> Mapping[str, Any]:
    """The keyword arguments of decoder layer ``layer`` (masks, position embeddings, position ids) out of captured
    ``kwargs``; ModelError when its layer type was not captured."""
    attr, by_type = kwargs["type_attr"], kwargs["by_type"]
    kind = _attribute(layer, attr) if attr else None
    if kind not in by_type:
        raise ModelError(f"no layer inputs were captured for layer type {kind!r}; captured {sorted(map(str, by_type))}")
    return by_type[kind]


def _attribute(module: nn.Module, path: str) -> Any:
    owner, _, name = path.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, name)


class _StopForward(Exception):
    """Raised to end a forward once every layer type's inputs are captured."""


class _Recorder(nn.Module):
    """Stands in for a decoder layer during capture: records its kwargs, runs nothing."""

    def __init__(self, kind: str | None, captured: dict, wanted: set) -> None:
        super().__init__()
        self.kind, self.captured, self.wanted = kind, captured, wanted

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.captured.setdefault("hidden", hidden_states)
        self.captured["kwargs"].setdefault(self.kind, kwargs)
        if set(self.captured["kwargs"]) >= self.wanted:
            raise _StopForward
        return hidden_states


def capture_layer_inputs(model: nn.Module, spec: ArchSpec, input_ids: torch.Tensor) -> tuple[torch.Tensor, LayerKwargs]:
    """Hidden states (b, t, d) entering the first decoder layer and the keyword arguments every layer receives.

    Runs only the embedding and the position/mask preparation of the backbone: each decoder layer is swapped
    for a recorder while it runs, so no layer computes and no logits are formed. The layers may be on the meta
    device. Raises ModelError when the backbone never calls its layers.
    """
    layers = decoder_layers(model, spec)
    kinds = [_attribute(layer, spec.layer_type) if spec.layer_type else None for layer in layers]
    captured: dict[str, Any] = {"kwargs": {}}
    originals = list(layers)
    for i, kind in enumerate(kinds):
        layers[i] = _Recorder(kind, captured, set(kinds))
    try:
        model.get_submodule(spec.backbone)(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    if set(captured["kwargs"]) != set(kinds):
        raise ModelError("the backbone never reached all its decoder layers; is this a decoder-only model?")
    return captured["hidden"], {"type_attr": spec.layer_type, "by_type": captured["kwargs"]}


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: LayerKwargs) -> torch.Tensor:
    """One decoder layer's output hidden states (b, t, d) for input hidden (b, t, d)."""
    out = layer(hidden, **kwargs_for(layer, kwargs))
    return out[0] if isinstance(out, tuple) else out
