"""Rates profiles: the throughputs the plan uses on one worker's device, each with where it comes from.

A rates file (YAML or JSON; written by ``scripts/gpu_check.py`` and ``scripts/cpu_rates.py``, or by hand for an
assumed profile) names its device, whether its rates were ``measured`` or ``assumed``, and each rate either as a
bare number (measured: the rate is also its peak) or as ``{peak, efficiency, source}`` (assumed: a published peak
times the efficiency assumed for our solver at our shapes)::

    device: NVIDIA H100 SXM5 80GB
    kind: assumed
    rates:
      matmul_gflops: {peak: 989000, efficiency: 0.5, source: "H100 SXM datasheet: dense BF16 tensor core"}
      read_gbps: 2.0

``runtime.rates`` names such a file (``--rates FILE`` on the CLI) or gives the rates inline. ``Rates`` holds the
values the estimate divides by and the peaks the physical floor divides by. Reads local files only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nesta_ray.errors import ConfigError

# Every rate a profile may state, GFLOP/s or GB/s per worker, and what it times.
FIELDS = {
    "matmul_gflops": "the calibration and evaluation forwards' products (at calibration.precision)",
    "gram_gflops": "the Gram products xᵀx (at calibration.precision; default matmul_gflops)",
    "gemm_gflops": "the decomposition's matrix products at its precision (default matmul_gflops)",
    "cholesky_gflops": "the whitening's Cholesky at the decomposition's precision (default svd_gflops)",
    "eigh_gflops": "symmetric eigendecompositions (the short side's Gram) (default svd_gflops)",
    "svd_gflops": "LAPACK's/cuSOLVER's SVD at the decomposition's precision",
    "qr_gflops": "QR of tall sketches (the randomized residual) (default svd_gflops)",
    "copy_gbps": "host <-> device copies (default: none, the CPU)",
    "read_gbps": "storage reads",
    "write_gbps": "storage writes",
}
FALLBACK = {"gram_gflops": "matmul_gflops", "gemm_gflops": "matmul_gflops", "cholesky_gflops": "svd_gflops",
            "eigh_gflops": "svd_gflops", "qr_gflops": "svd_gflops"}


@dataclass(frozen=True)
class Rates:
    """Throughputs for time estimates (GFLOP/s, GB/s; None: the ``FALLBACK`` rate, or no copy cost), their peaks
    for the floor (name -> peak; a rate without one is its own peak), their sources (name -> text) and a label
    (where the profile comes from, e.g. "assumed: NVIDIA H100 ...")."""

    matmul_gflops: float
    svd_gflops: float
    read_gbps: float = 1.0
    write_gbps: float = 0.5
    gram_gflops: float | None = None
    gemm_gflops: float | None = None
    cholesky_gflops: float | None = None
    eigh_gflops: float | None = None
    qr_gflops: float | None = None
    copy_gbps: float | None = None
    peaks: dict[str, float] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    label: str = ""

    def rate(self, name: str) -> float:
        """The rate ``name`` (a key of FIELDS), its fallback where unset; inf for an unset ``copy_gbps``."""
        value = getattr(self, name)
        if value is None:
            return float("inf") if name == "copy_gbps" else self.rate(FALLBACK[name])
        return float(value)

    def peak(self, name: str) -> float:
        """The peak of rate ``name`` (the rate itself where no peak is stated)."""
        if name in self.peaks:
            return self.peaks[name]
        fallback = FALLBACK.get(name)
        if getattr(self, name) is None and fallback is not None:
            return self.peak(fallback)
        return self.rate(name)

    def flops_seconds(self, flops: dict[str, float], *, at_peak: bool = False) -> float:
        """Seconds of work by kind (``factorize.flops`` keys: gemm, cholesky, eigh, svd, qr) at these rates."""
        of = self.peak if at_peak else self.rate
        return sum(f / (of(f"{kind}_gflops") * 1e9) for kind, f in flops.items() if f)

    def describe(self) -> str:
        """One line: the label and every rate in use, assumed ones with their efficiency."""
        parts = []
        for name in FIELDS:
            if getattr(self, name) is None:
                continue
            value, peak = self.rate(name), self.peak(name)
            eff = f" = {value / peak:.0%} of {peak:,.0f}" if peak != value else ""
            parts.append(f"{name.rsplit('_', 1)[0]} {value:,.1f}{eff}")
        return f"{self.label}: " + ", ".join(parts)


def _entry(name: str, raw: Any, where: str) -> tuple[float, float | None, str | None]:
    """(value, peak or None, source or None) of one stated rate. Raises ConfigError for a malformed one."""
    if isinstance(raw, (int, float)) and not isinstance(raw, bool) and raw > 0:
        return float(raw), None, None
    if isinstance(raw, dict) and set(raw) <= {"peak", "efficiency", "source", "value"}:
        try:
            peak = float(raw["peak"]) if "peak" in raw else None
            value = float(raw["value"]) if "value" in raw else float(raw["peak"]) * float(raw.get("efficiency", 1.0))
        except (KeyError, TypeError, ValueError):
            value, peak = -1.0, None
        if value > 0 and (peak is None or peak >= value):
            return value, peak, None if raw.get("source") is None else str(raw["source"])
    raise ConfigError(f"{where}: rates.{name} must be a positive number or {{peak, efficiency (0-1], source}} "
                      f"with the peak >= the rate, got {raw!r}")


def rates_from(obj: Any, where: str) -> Rates:
    """Rates of a parsed rates file (see the module docstring). Raises ConfigError naming the field and the fix."""
    if not isinstance(obj, dict) or not isinstance(obj.get("rates"), dict):
        raise ConfigError(f"{where}: a rates file holds a mapping with 'device', 'kind' (measured | assumed) and "
                          "'rates' (scripts/cpu_rates.py writes one)")
    kind, rates = obj.get("kind", "measured"), obj["rates"]
    unknown = sorted(set(rates) - set(FIELDS))
    if kind not in ("measured", "assumed") or unknown:
        raise ConfigError(f"{where}: kind must be measured or assumed (got {kind!r}) and rates one of "
                          f"{', '.join(FIELDS)} (unknown: {', '.join(unknown) or 'none'})")
    for need in ("matmul_gflops", "svd_gflops"):
        if need not in rates:
            raise ConfigError(f"{where}: rates.{need} is required")
    values, peaks, sources = {}, {}, {}
    for name, raw in rates.items():
        values[name], peak, source = _entry(name, raw, where)
        if peak is not None:
            peaks[name] = peak
        if source is not None:
            sources[name] = source
    label = f"{kind} ({obj.get('device', 'unnamed device')}; {Path(where).name})"
    return Rates(**values, peaks=peaks, sources=sources, label=label)


def read_rates(path: str) -> Rates:
    """Rates from a local rates file (YAML or JSON). Raises ConfigError when it is missing or malformed."""
    try:
        obj = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"runtime.rates: rates file {path} does not exist (write one with scripts/cpu_rates.py "
                          "or scripts/gpu_check.py)") from None
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"runtime.rates: cannot read {path} ({type(err).__name__})") from None
    return rates_from(obj, path)


def rates_file(device: str, values: dict[str, float], extra: dict[str, Any] | None = None) -> str:
    """The JSON text of a measured rates file for ``device`` with ``values`` (name -> rate) and ``extra`` fields
    (e.g. how each was measured)."""
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown rates {unknown}; known: {list(FIELDS)}")
    body = {"device": device, "kind": "measured", "rates": {k: round(v, 3) for k, v in values.items()},
            **(extra or {})}
    return json.dumps(body, indent=2) + "\n"
