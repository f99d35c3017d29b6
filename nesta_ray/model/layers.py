"""Decoder-layer surgery: find layers and linears, build layers on the meta device, capture and run one layer.

Architecture names come from ``model.arch``; no I/O here.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from nesta_ray.errors import ModelError
from nesta_ray.model.arch import ArchSpec


def decoder_layers(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    """The decoder layers of a causal LM (e.g. ``model.model.layers``). Raises ModelError when that path does not
    hold a list of layers."""
    layers = model.get_submodule(spec.layers)
    if not isinstance(layers, nn.ModuleList):
        raise ModelError(f"{spec.layers} is a {type(layers).__name__}, not the list of decoder layers")
    return layers


def weight_of(module: nn.Module) -> torch.Tensor:
    """The ``weight`` tensor of a linear (a module attribute torch types as tensor-or-module)."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor), f"{type(module).__name__} has no weight tensor"
    return weight


def config_of(model: nn.Module) -> Any:
    """The transformers config a causal LM carries (``model.config``)."""
    return model.config


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

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


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


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """alias -> kept name for parameters that are one tensor under two names (e.g. a tied lm_head)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def materialise_all(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Give a whole causal LM built under ``parameters_on_meta`` its stored tensors (full names; tied aliases
    may be absent and are re-tied), cast to the model's dtypes. Raises ModelError naming missing or unexpected
    keys."""
    expected = model.state_dict()
    aliases = set(tied_aliases(model))
    missing = sorted(set(expected) - set(state) - aliases)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelError(f"weights do not match {type(model).__name__}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=False, assign=True)
    model.tie_weights()  # type: ignore[operator]  # a transformers model's method


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


def head_logits(model: nn.Module, spec: ArchSpec, hidden: torch.Tensor) -> torch.Tensor:
    """Logits (b, t, V) from the last decoder layer's outputs (b, t, d): the final norm, the head and the
    family's logit soft-capping where its config sets one (Gemma), as the model's own forward computes them."""
    logits = model.get_submodule(spec.head)(model.get_submodule(f"{spec.backbone}.{spec.norm}")(hidden))
    cap = getattr(config_of(model), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: LayerKwargs) -> torch.Tensor:
    """One decoder layer's output hidden states (b, t, d) for input hidden (b, t, d)."""
    out = layer(hidden, **kwargs_for(layer, kwargs))
    return out[0] if isinstance(out, tuple) else out
