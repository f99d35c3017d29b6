"""nesta_ray: distributed post-training low-rank compression of causal LMs by nested activation-aware SVD.

Importing it registers the low-rank checkpoint classes with transformers' Auto classes (as soon as transformers is
imported; see ``nesta_ray.model.registration``), so ``AutoModelForCausalLM.from_pretrained(run)`` loads a run.
"""

from typing import Any

from nesta_ray.model.registration import register_on_import

__version__ = "0.1.0"
__all__ = ["__version__", "load_compressed"]

register_on_import()


def __getattr__(name: str) -> Any:
    # Lazy: `import nesta_ray` stays cheap (no torch/transformers) until the loader is used.
    if name == "load_compressed":
        from nesta_ray.checkpoint.reader import load_compressed

        return load_compressed
    raise AttributeError(f"module 'nesta_ray' has no attribute {name!r}")
