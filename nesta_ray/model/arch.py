"""The architecture map: every architecture-specific name in nesta_ray lives in ``ARCHITECTURES``. No I/O."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from nesta_ray.errors import ModelError


@dataclass(frozen=True)
class ArchSpec:
    """Where a decoder-only family keeps its layers and which linears share an input.

    ``groups`` maps an input-group name to the linears (paths inside one decoder layer) that read that input;
    the first linear of each group carries the statistics hook. ``stem`` names the backbone modules with stored
    weights that the first decoder layer's inputs need (the token embedding); ``norm`` (in the backbone) and
    ``head`` (at the top) turn the last layer's outputs into logits. ``layer_type`` is the attribute
    path, inside a decoder layer, of its attention type when layers of one model take different masks or
    position embeddings (Gemma-3's sliding and global layers); None when all layers take the same.
    """

    layers: str
    groups: Mapping[str, tuple[str, ...]]
    stem: tuple[str, ...] = ("embed_tokens",)
    layer_type: str | None = None
    norm: str = "norm"
    head: str = "lm_head"

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

    def layer_prefix(self, layer: int) -> str:
        """Full-name prefix of decoder layer ``layer``'s modules, e.g. "model.layers.3."."""
        return f"{self.layers}.{layer}."

    def layer_of(self, name: str) -> int:
        """The decoder layer index in a full module name (e.g. 3 for "model.layers.3.mlp.up_proj"). Raises
        ModelError for a name outside the decoder layers."""
        head, _, rest = name.partition(f"{self.layers}.")
        index = rest.split(".", 1)[0]
        if head or not index.isdigit():
            raise ModelError(f"{name!r} is not inside a decoder layer ({self.layers}.<i>.)")
        return int(index)


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
# Every linear short name any supported architecture compresses, in map order (the config's ``method.targets``).
TARGETS: tuple[str, ...] = tuple(dict.fromkeys(n for spec in ARCHITECTURES.values() for n in spec.short_names()))


def arch_for(model_type: str) -> ArchSpec:
    """The ArchSpec of a transformers ``config.model_type``; ModelError naming the supported ones otherwise."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise ModelError(
            f"architecture {model_type!r} is not supported; nesta_ray compresses {', '.join(sorted(ARCHITECTURES))}"
        ) from None
