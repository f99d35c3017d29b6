"""Per-layer results staged under ``<output>/staging/<job fingerprint>/``, so a rerun of the same job resumes.

Each finished layer is one object, ``layer-NNNNN.safetensors``: the factor pairs ``<linear>.A`` (out, k) and
``<linear>.B`` (k, in) of its planned linears, with their statistics (ranks, losses, fallbacks, seconds) as JSON in
the safetensors metadata. One object per layer, written atomically: a layer is either staged whole or not at all.
A different fingerprint (model, calibration data, config or code version) stages elsewhere, so runs never mix.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from nesta_ray import __version__
from nesta_ray.storage import join, list_names, put_object, read_bytes, remove_tree

_STATS = ("k1", "k2", "loss", "relative_loss", "fallbacks", "seconds")


def code_version() -> str:
    """nesta_ray's version plus a hash of the source of the modules that compute factors, so a code change in
    the math never reuses factors staged by older code."""
    from pathlib import Path

    import nesta_ray.calibration
    import nesta_ray.decompose
    import nesta_ray.pipeline.tasks

    digest = hashlib.sha256(__version__.encode())
    for module in (nesta_ray.decompose, nesta_ray.calibration, nesta_ray.pipeline.tasks):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


def job_fingerprint(config: str, model: str, calibration: str) -> str:
    """Key of a job's staged results: config, source model and calibration-token fingerprints plus code version."""
    return hashlib.sha256(f"{config}|{model}|{calibration}|{code_version()}".encode()).hexdigest()[:24]


class LayerStage:
    """Staged per-layer results of one job fingerprint under ``root_uri/staging/<fingerprint>``."""

    def __init__(self, root_uri: str, fingerprint: str, storage_options: dict | None = None) -> None:
        self.uri = join(root_uri, "staging", fingerprint)
        self.storage_options = storage_options

    @staticmethod
    def _name(layer: int) -> str:
        return f"layer-{layer:05d}.safetensors"

    def done(self) -> set[int]:
        """Indices of the layers already staged."""
        names = list_names(self.uri, self.storage_options)
        return {int(n[6:11]) for n in names if n.startswith("layer-") and n.endswith(".safetensors")}

    def put(self, layer: int, results: dict[str, dict]) -> None:
        """Stage one layer's results (linear name -> {"A", "B" numpy arrays, statistics}) as one object."""
        tensors, stats = {}, {}
        for name, r in results.items():
            tensors[f"{name}.A"] = torch.from_numpy(np.array(r["A"], order="C"))  # copies: Ray's arrays are read-only
            tensors[f"{name}.B"] = torch.from_numpy(np.array(r["B"], order="C"))
            stats[name] = {k: r[k] for k in _STATS}
        data = st_save(tensors, metadata={"stats": json.dumps(stats, sort_keys=True)})
        put_object(join(self.uri, self._name(layer)), data, self.storage_options)

    def get(self, layer: int) -> dict[str, dict]:
        """One staged layer's results, in the form ``put`` took (A and B as numpy arrays)."""
        blob = read_bytes(join(self.uri, self._name(layer)), self.storage_options)
        tensors = st_load(blob)
        stats = json.loads(_metadata(blob)["stats"])
        return {name: {"A": tensors[f"{name}.A"].numpy(), "B": tensors[f"{name}.B"].numpy(), **s}
                for name, s in stats.items()}

    def clear(self) -> None:
        """Delete this stage (after its results were committed in a run)."""
        remove_tree(self.uri, self.storage_options)

    def mark(self, name: str) -> bool:
        """Create the marker ``name`` once; True if this call created it (used to inject a fault only once)."""
        if name in list_names(self.uri, self.storage_options):
            return False
        put_object(join(self.uri, name), b"", self.storage_options)
        return True


def _metadata(blob: bytes) -> dict[str, str]:
    size = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + size]).get("__metadata__", {})
