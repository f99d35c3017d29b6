"""The job configuration's method section: which decomposition, at which ratio (fixed or automatic), how ranks
are spread over the linears, and which linears. Its defaults are ``Method()``'s, so a knob has one default in the
whole package."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from nesta_ray.config.validators import Strict
from nesta_ray.method.decompose import METHODS, Method, MethodName
from nesta_ray.model.arch import TARGETS

ALL_TARGETS = list(TARGETS)
_DEFAULT = Method()


class AutoRatioConfig(Strict):
    set: str = Field(description="the evaluation set (a name in evaluation.sets) whose perplexity bounds the ratio")
    max_increase: float = Field(0.10, gt=0.0,
                                description="largest relative perplexity increase over dense (0.1 = +10%)")
    min_ratio: float = Field(0.05, gt=0.0, lt=1.0, description="smallest ratio tried")
    max_ratio: float = Field(0.6, gt=0.0, lt=1.0, description="largest ratio tried")
    step: float = Field(0.05, gt=0.0, lt=1.0, description="grid step between min_ratio and max_ratio")

    @model_validator(mode="after")
    def _range(self) -> AutoRatioConfig:
        if self.min_ratio > self.max_ratio:
            raise ValueError(f"min_ratio {self.min_ratio} exceeds max_ratio {self.max_ratio}")
        return self

    def grid(self) -> list[float]:
        """Candidate ratios, ascending: min_ratio, min_ratio + step, ... up to max_ratio."""
        count = int((self.max_ratio - self.min_ratio) / self.step + 1e-9) + 1
        return [round(self.min_ratio + i * self.step, 10) for i in range(count)]


class MethodConfig(Strict):
    name: MethodName = Field(_DEFAULT.name, description=f"decomposition method, one of {', '.join(METHODS)}")
    ratio: float | Literal["auto"] = Field(0.2, description="fraction of the compressed linears' parameters to "
                                           "remove, in [0, 1), or auto (the largest ratio method.auto allows)")
    auto: AutoRatioConfig | None = Field(None,
                                         description="with ratio: auto, the perplexity bound that picks the ratio")
    k1_fraction: float = Field(_DEFAULT.k1_fraction, ge=0.0, le=1.0,
                               description="share of the rank given to the whitened stage of nsvd, in [0, 1]")
    k1_tolerance: float | None = Field(_DEFAULT.k1_tolerance, ge=0.0,
                                       description="nsvd: k1 per matrix, the smallest whose whitened "
                                       "loss is within (1 + tolerance) of the rank-k optimum (default 0.02, chosen "
                                       "by docs/quality.md); null uses the global k1_fraction instead")
    damping: float = Field(_DEFAULT.damping, ge=0.0, le=0.1,
                           description="relative Gram damping λ (λ·mean diag added), in [0, 0.1]")
    alpha: float = Field(_DEFAULT.alpha, gt=0.0, le=2.0, description="ASVD scaling exponent, in (0, 2]")
    anchored: bool = Field(_DEFAULT.anchored, description="fit each linear's whitened stage to the dense model's "
                           "outputs from the inputs the compressed model produces (reduced-rank regression, "
                           "nesta_ray/method/anchored.py); a whitened method with calibration.mode: propagate")
    anchor: Literal["regression", "left"] = Field(
        _DEFAULT.anchor, description="anchored: the fit: regression (reduced-rank regression of the whitened stage "
        "on all n input directions) or left (the whitened SVD's right factor of the compressed inputs kept, the "
        "left factor refitted: a k-dimensional regression, far fewer coefficients to estimate)")
    allocation: Literal["uniform", "sensitivity"] = Field(
        "uniform", description="ranks per linear: uniform (each linear at the ratio) or sensitivity (the same "
        "parameter count spent where the model's loss reacts most: a K-FAC estimate of each linear's loss increase "
        "from one backward pass of the calibration loss; a linear past its break-even rank stays dense; "
        "nesta_ray/method/allocation.py, docs/quality.md); needs calibration.mode: original")
    sensitivity_windows: int = Field(16, ge=1, description="allocation: sensitivity: the first calibration "
                                     "windows whose loss gradients measure each linear's sensitivity")
    targets: list[str] = Field(default_factory=lambda: list(ALL_TARGETS), min_length=1,
                               description=f"linears to compress, from {ALL_TARGETS}")
    layers: list[int] | None = Field(None, min_length=1, description="decoder layer indices to compress (default: all)")
    rank_overrides: dict[str, int] = Field(default_factory=dict, description="full module name -> rank (>= 1)")

    @field_validator("ratio", mode="before")
    @classmethod
    def _ratio(cls, v: Any) -> Any:
        if v == "auto":
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
            raise ValueError("must be a number in [0, 1) or auto")
        return float(v)

    @model_validator(mode="after")
    def _check(self) -> MethodConfig:
        if self.ratio == "auto" and self.auto is None:
            raise ValueError("ratio: auto needs an auto section, e.g. auto: {set: c4_heldout, max_increase: 0.1}")
        if self.ratio != "auto" and self.auto is not None:
            raise ValueError("an auto section is used only with ratio: auto")
        unknown = [t for t in self.targets if t not in ALL_TARGETS]
        if unknown:
            raise ValueError(f"unknown targets {unknown}; choose from {ALL_TARGETS}")
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers lists an index twice: {self.layers}")
        bad = {k: v for k, v in self.rank_overrides.items() if v < 1}
        if bad:
            raise ValueError(f"rank_overrides must be >= 1, got {bad}")
        if self.anchored and self.name in ("svd", "asvd0"):
            raise ValueError(f"anchored needs a whitened method (asvd1, asvd2, nsvd1, nsvd2), not {self.name}")
        if self.ratio == "auto" and (self.anchored or self.allocation != "uniform"):
            raise ValueError("ratio: auto tries uniform ratios on the dense statistics; anchored and allocation: "
                             "sensitivity need a fixed ratio (for the search set allocation: uniform, anchored: "
                             "false)")
        if self.allocation != "uniform" and self.name in ("svd", "asvd0"):
            raise ValueError(f"allocation: sensitivity weighs the whitened spectrum: a whitened method (asvd1, "
                             f"asvd2, nsvd1, nsvd2), not {self.name}")
        if self.allocation != "uniform" and self.rank_overrides:
            raise ValueError("rank_overrides fix ranks that allocation: sensitivity would choose; use one of them")
        return self

    def as_method(self) -> Method:
        """The decomposition knobs as the frozen object ``decompose`` takes."""
        return Method(self.name, self.k1_fraction, self.k1_tolerance, self.damping, self.alpha, self.anchored,
                      self.anchor)
