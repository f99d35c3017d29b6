"""Per-layer results staged under ``<output>/staging/<job fingerprint>/``, so a rerun of the same job resumes.

Each finished layer is one object (``layout.stage_object``): the factor pairs of its planned linears as stored in
a run (``layout.factor_tensors``), with their statistics (``Factors.stats``) as JSON in the safetensors metadata.
One object per layer, written atomically: a layer is either staged whole or not at all. A job that allocates
ranks by sensitivity stages its allocation first (``layout.STAGE_ALLOCATION``), so a rerun plans with the same
ranks without measuring again. A different fingerprint (model, calibration data, config or code version) stages
elsewhere, so runs never mix.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from nesta_ray import __version__
from nesta_ray.checkpoint.layout import (
    STAGE_ALLOCATION,
    STAGING,
    factor_tensors,
    factors_from,
    stage_object,
    staged_layer,
)
from nesta_ray.errors import CheckpointError
from nesta_ray.io.storage import join, json_bytes, list_names, put_object, read_bytes, read_json, remove_tree
from nesta_ray.method.allocation import Allocation
from nesta_ray.method.decompose import Factors

_PACKAGE = Path(__file__).resolve().parents[1]


def code_version(package: Path = _PACKAGE) -> str:
    """nesta_ray's version, torch's and transformers' versions and a hash of the source of every module of
    ``package`` (this nesta_ray): whatever code can change a factor (the decomposition, the calibration hooks and
    Gram sums, the layer forward, the backends) is covered, so factors staged by other code are never reused."""
    digest = hashlib.sha256(__version__.encode())
    for dist in ("torch", "transformers"):
        digest.update(f"|{dist}={importlib.metadata.version(dist)}".encode())
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def job_fingerprint(config: str, model: str, calibration: str) -> str:
    """Key of a job's staged results: config, source model and calibration-token fingerprints plus code version."""
    return hashlib.sha256(f"{config}|{model}|{calibration}|{code_version()}".encode()).hexdigest()[:24]


@dataclass(frozen=True)
class LayerStage:
    """Staged per-layer results of one job fingerprint under ``root_uri/staging/<fingerprint>``. Plain values
    only, so a stage can be passed to (and opened in) any process, and compared."""

    root_uri: str
    fingerprint: str
    storage_options: dict | None = None

    @property
    def uri(self) -> str:
        return join(self.root_uri, STAGING, self.fingerprint)

    def done(self) -> set[int]:
        """Indices of the layers already staged."""
        return {i for i in map(staged_layer, list_names(self.uri, self.storage_options)) if i is not None}

    def put(self, layer: int, factors: Mapping[str, Factors]) -> None:
        """Stage one layer's factors (linear full name -> Factors) as one object."""
        tensors = {k: t for name, f in factors.items() for k, t in factor_tensors(name, f).items()}
        stats = {name: f.stats() for name, f in factors.items()}
        data = st_save(tensors, metadata={"stats": json.dumps(stats, sort_keys=True)})
        put_object(join(self.uri, stage_object(layer)), data, self.storage_options)

    def get(self, layer: int) -> dict[str, Factors]:
        """One staged layer's factors, as ``put`` took them. Raises CheckpointError for a corrupt object."""
        uri = join(self.uri, stage_object(layer))
        blob = read_bytes(uri, self.storage_options)
        try:
            tensors = st_load(blob)
            stats = json.loads(_metadata(blob)["stats"])
            return {name: factors_from(tensors, name, s) for name, s in stats.items()}
        except (SafetensorError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{uri} is corrupt ({type(err).__name__}: {err}); delete it to recompute the "
                                  "layer") from None

    def put_allocation(self, allocation: Allocation) -> None:
        """Stage the job's rank allocation (before any layer at its ranks)."""
        put_object(join(self.uri, STAGE_ALLOCATION), json_bytes(allocation.as_dict()), self.storage_options)

    def allocation(self) -> Allocation | None:
        """The staged rank allocation, or None when none is staged. Raises CheckpointError for a corrupt one."""
        if STAGE_ALLOCATION not in list_names(self.uri, self.storage_options):
            return None
        uri = join(self.uri, STAGE_ALLOCATION)
        try:
            return Allocation.from_dict(read_json(uri, self.storage_options))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CheckpointError(f"{uri} is corrupt ({type(err).__name__}: {err}); delete it to allocate "
                                  "again") from None

    def clear(self) -> None:
        """Delete this stage (after its results were committed in a run)."""
        remove_tree(self.uri, self.storage_options)



def _metadata(blob: bytes) -> dict[str, str]:
    size = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + size]).get("__metadata__", {})
