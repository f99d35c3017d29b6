"""Hugging Face classes of a nesta_ray low-rank checkpoint: NestaLowRankConfig and NestaLowRankForCausalLM.

Torch and transformers only, plus LowRankLinear from the sibling ``lowrank_linear.py``: the checkpoint writer copies
both files verbatim into every run, so ``AutoModelForCausalLM.from_pretrained(run, trust_remote_code=True)`` loads
a run without nesta_ray, and ``import nesta_ray`` registers these same classes with the Auto classes.

A run's config.json is a NestaLowRankConfig: ``model_type`` ``nesta_lowrank``, the source model's own config under
``text_config`` and the rank of every compressed linear under ``lowrank_ranks``. Its weights are the variant
``nesta_lowrank`` (``model.safetensors.index.nesta_lowrank.json``): a loader that does not know the format (e.g.
``LlamaForCausalLM.from_pretrained(run)``) finds no weights and stops, instead of filling the compressed linears
with random values. ``from_pretrained`` here refuses a checkpoint with any missing or unexpected tensor.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel

from .lowrank_linear import LowRankLinear, multiply_out

MODEL_TYPE = "nesta_lowrank"
WEIGHTS_VARIANT = "nesta_lowrank"  # model.safetensors.index.nesta_lowrank.json: no stock loader looks for it


class NestaLowRankConfig(PretrainedConfig):
    """The source model's config (``text_config``, any causal LM transformers knows) and the rank k of every
    compressed linear (``lowrank_ranks``: full module name such as ``model.layers.0.self_attn.q_proj`` -> k).
    ``tie_word_embeddings`` is always the source's."""

    model_type = MODEL_TYPE
    sub_configs = {"text_config": AutoConfig}

    def __init__(self, text_config: PretrainedConfig | dict | None = None,
                 lowrank_ranks: dict[str, int] | None = None, **kwargs: Any) -> None:
        if isinstance(text_config, dict):
            text_config = AutoConfig.for_model(**text_config)
        self.text_config = text_config
        self.lowrank_ranks = {str(name): int(rank) for name, rank in (lowrank_ranks or {}).items()}
        kwargs["tie_word_embeddings"] = bool(getattr(text_config, "tie_word_embeddings", False))
        super().__init__(**kwargs)


class NestaLowRankForCausalLM(PreTrainedModel, GenerationMixin):
    """The source architecture's causal LM with every linear named in ``config.lowrank_ranks`` replaced by a
    LowRankLinear. It adopts the base model's children (``model``, ``lm_head``), so its tensor names are the base
    checkpoint's (``model.layers.0.self_attn.q_proj.A``, ``lm_head.weight``); forward and generation are the base
    model's."""

    config_class = NestaLowRankConfig
    base: Any  # the source architecture's causal LM, kept outside the module tree (its children are ours)
    base_model_prefix = ""  # tensor names are the base model's own: nothing to add or strip
    _supports_sdpa = True  # the forward is the base model's; every family nesta_ray compresses supports these
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: NestaLowRankConfig) -> None:
        super().__init__(config)
        base = AutoModelForCausalLM.from_config(config.text_config, dtype=torch.get_default_dtype())
        for name, rank in config.lowrank_ranks.items():
            old = base.get_submodule(name)
            parent, _, leaf = name.rpartition(".")
            setattr(base.get_submodule(parent), leaf, LowRankLinear(
                old.in_features, old.out_features, rank, bias=old.bias is not None, dtype=old.weight.dtype,
                device=old.weight.device))
        for child_name, child in base.named_children():
            self.add_module(child_name, child)
        self.__dict__["base"] = base  # not a submodule: its children are ours
        self._tied_weights_keys = base._tied_weights_keys
        self._no_split_modules = base._no_split_modules
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any) -> Any:
        """PreTrainedModel.from_pretrained reading the ``nesta_lowrank`` weight files (unless ``variant`` is
        given). Raises ValueError when the checkpoint lacks a tensor of the model or holds one it does not have:
        a compressed model is never completed with random weights."""
        kwargs.setdefault("variant", WEIGHTS_VARIANT)
        want_info = kwargs.pop("output_loading_info", False)
        loaded: Any = super().from_pretrained(pretrained_model_name_or_path, *model_args, output_loading_info=True,
                                              **kwargs)
        model, info = loaded
        wrong = {key: sorted(info.get(key) or [])[:5] for key in ("missing_keys", "unexpected_keys",
                                                                  "mismatched_keys") if info.get(key)}
        if wrong:
            raise ValueError(f"{pretrained_model_name_or_path}: the checkpoint's tensors do not match its "
                             f"config ({wrong}); the run is damaged or was edited")
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        """PreTrainedModel.save_pretrained writing the low-rank format again (config, modeling files and the
        ``nesta_lowrank`` weight files; ``variant`` may override the weights' name)."""
        kwargs.setdefault("variant", WEIGHTS_VARIANT)
        return super().save_pretrained(save_directory, *args, **kwargs)

    def to_dense(self) -> PreTrainedModel:
        """The base model (the source architecture's class and ``text_config``) with every LowRankLinear multiplied
        out into an nn.Linear, for tools that know no low-rank layers: it is as large as the source model. This
        model's modules change with it."""
        return multiply_out(self.base)

    def _init_weights(self, module: torch.nn.Module) -> None:
        if isinstance(module, LowRankLinear):
            module.reset_parameters()
        elif module is not self:
            self.base._init_weights(module)

    def get_input_embeddings(self) -> Any:
        return self.base.get_input_embeddings()

    def set_input_embeddings(self, value: Any) -> None:
        self.base.set_input_embeddings(value)

    def get_output_embeddings(self) -> Any:
        return self.base.get_output_embeddings()

    def set_output_embeddings(self, value: Any) -> None:
        self.base.set_output_embeddings(value)

    def train(self, mode: bool = True) -> NestaLowRankForCausalLM:
        super().train(mode)
        self.base.training = mode
        return self

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, logits_to_keep: int | torch.Tensor = 0, **kwargs: Any) -> Any:
        """The base model's forward. The arguments generation looks for in the signature are spelled out, so that
        it prepares the same inputs as for the base model; everything else (the cache, labels, ...) passes
        through ``kwargs`` under the base model's own names."""
        return self.base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         logits_to_keep=logits_to_keep, **kwargs)

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> Any:
        return self.base.prepare_inputs_for_generation(*args, **kwargs)


NestaLowRankConfig.register_for_auto_class()  # save_pretrained writes auto_map and copies these files
NestaLowRankForCausalLM.register_for_auto_class("AutoModelForCausalLM")
