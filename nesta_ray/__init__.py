"""nesta_ray: distributed post-training low-rank compression of causal LMs by nested activation-aware SVD."""

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_compressed"]


def __getattr__(name: str) -> Any:
    # Lazy: `import nesta_ray` stays cheap (no torch/transformers) until the loader is used.
    if name == "load_compressed":
        from nesta_ray.checkpoint.reader import load_compressed

        return load_compressed
    raise AttributeError(f"module 'nesta_ray' has no attribute {name!r}")
