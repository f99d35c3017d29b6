"""``nesta.json``: a run's metadata as a typed object, and its JSON form (written and read only here; the same
fields in format v1 and v2)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nesta_ray import __version__
from nesta_ray.checkpoint.layout import FORMAT, FORMAT_VERSION, READABLE_VERSIONS
from nesta_ray.errors import CheckpointError
from nesta_ray.method.decompose import Factors, Method


@dataclass(frozen=True)
class LinearRecord:
    """One compressed linear as nesta.json records it: rank, shape (out, in), nested split, whitened loss (absolute
    and relative to tr(W·G·Wᵀ)), numerical fallback counts, decomposition seconds, and where and how it was
    factorised (``solver``: device, precision, methods; empty in runs written before it was recorded)."""

    rank: int
    shape: tuple[int, int]
    k1: int
    k2: int
    loss: float
    relative_loss: float
    fallbacks: dict[str, int]
    seconds: float
    solver: str = ""

    @classmethod
    def of(cls, f: Factors, shape: tuple[int, int]) -> LinearRecord:
        """The record of decomposed factors ``f`` of an (out, in) = ``shape`` linear."""
        return cls(f.rank, shape, f.k1, f.k2, f.loss, f.relative_loss, dict(f.fallbacks), round(f.seconds, 4),
                   f.solver)

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "shape": list(self.shape)}


@dataclass(frozen=True)
class RunMeta:
    """What a run is: its id, model dtype, method and ratio, every compressed linear, tied aliases (alias -> kept
    name), parameter totals, summed fallbacks, the fingerprints of model, calibration tokens and config, and the
    checkpoint format version it was written in."""

    run_id: str
    dtype: str
    method: Method
    ratio: float
    modules: dict[str, LinearRecord]
    tied: dict[str, str] = field(default_factory=dict)
    parameters: dict[str, int] = field(default_factory=dict)
    fallbacks: dict[str, int] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        """The JSON object (method knobs at the top level, as every reader since v1 expects)."""
        return {
            "format": FORMAT, "format_version": self.format_version, "nesta_ray_version": __version__,
            "run_id": self.run_id, "dtype": self.dtype, "method": self.method.name, "ratio": self.ratio,
            "k1_fraction": self.method.k1_fraction, "k1_tolerance": self.method.k1_tolerance,
            "damping": self.method.damping, "alpha": self.method.alpha, "anchored": self.method.anchored,
            "anchor": self.method.anchor,
            "modules": {name: r.as_dict() for name, r in self.modules.items()},
            "solvers": dict(Counter(r.solver for r in self.modules.values())),  # linears per device/precision/method
            "tied": self.tied, "parameters": self.parameters, "fallbacks": self.fallbacks,
            "fingerprints": self.fingerprints,
        }

    @classmethod
    def from_json(cls, obj: Any, where: str) -> RunMeta:
        """Parse a nesta.json object of any readable version read from ``where``. Raises CheckpointError for another
        format or version, or a malformed object (naming the field)."""
        known = isinstance(obj, dict) and obj.get("format") == FORMAT
        if not known or obj.get("format_version") not in READABLE_VERSIONS:
            got = (obj.get("format"), obj.get("format_version")) if isinstance(obj, dict) else (type(obj).__name__, "")
            readable = "/".join(f"v{v}" for v in READABLE_VERSIONS)
            raise CheckpointError(f"{where}: not a {FORMAT} {readable} checkpoint (nesta.json says "
                                  f"{got[0]} v{got[1]})")
        try:
            method = Method(obj["method"], obj["k1_fraction"], obj["k1_tolerance"], obj["damping"], obj["alpha"],
                            bool(obj.get("anchored", False)), obj.get("anchor", "regression"))  # older runs: absent
            modules = {name: _record(r) for name, r in obj["modules"].items()}
            return cls(str(obj["run_id"]), str(obj["dtype"]), method, obj["ratio"], modules, dict(obj["tied"]),
                       dict(obj["parameters"]), dict(obj["fallbacks"]), dict(obj["fingerprints"]),
                       int(obj["format_version"]))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CheckpointError(f"{where}: nesta.json is malformed ({type(err).__name__}: {err})") from None


def _record(r: Mapping[str, Any]) -> LinearRecord:
    m, n = r["shape"]
    return LinearRecord(int(r["rank"]), (int(m), int(n)), int(r["k1"]), int(r["k2"]), float(r["loss"]),
                        float(r["relative_loss"]), dict(r["fallbacks"]), float(r["seconds"]), str(r.get("solver", "")))
