"""Frozen dataclasses of tensors that cross process boundaries as numpy arrays.

Ray's object store passes numpy arrays zero-copy (read-only on the reader's side) but pickles and copies torch
tensors. ``NumpyPickled`` makes a dataclass pickle each tensor field as a numpy array and rebuild it as a writable
torch tensor, so results and statistics travel between Ray processes as cheaply as plain arrays.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch


def _rebuild(cls: type, values: dict[str, Any]) -> Any:
    fields = {k: torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else v for k, v in values.items()}
    return cls(**fields)


class NumpyPickled:
    """Mixin for frozen dataclasses: tensor fields pickle as numpy arrays (CPU, detached) and unpickle as writable
    torch tensors of the same dtype; other fields pickle as they are."""

    def __reduce__(self) -> tuple[Any, tuple[type, dict[str, Any]]]:
        values: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            values[f.name] = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v
        return _rebuild, (type(self), values)
