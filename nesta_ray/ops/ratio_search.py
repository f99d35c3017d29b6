"""The automatic ratio's search: the largest ratio of a grid whose perplexity stays within a bound over dense.

Bisection over the grid; this assumes perplexity grows with the ratio, and every point tried is reported, so a curve
that does not is visible. Pure orchestration: trying a ratio (decomposing and evaluating) is the caller's callback,
so the same search runs in-process and on layer shards.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Generic, TypeVar

from nesta_ray.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class RatioPoint:
    """One ratio tried: perplexity on the bounding set, its increase over dense, whether it passed, seconds spent."""

    ratio: float
    perplexity: float
    increase: float
    passed: bool
    seconds: float


@dataclass(frozen=True)
class RatioChoice(Generic[T]):
    """The chosen ratio, the points walked (in the order tried), the dense perplexity, and what trying the chosen
    ratio produced (its factors)."""

    ratio: float
    points: list[RatioPoint]
    dense_perplexity: float
    chosen: T

    def summary(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "dense_perplexity": self.dense_perplexity,
                "points": [asdict(p) for p in sorted(self.points, key=lambda p: p.ratio)]}


def search_ratio(grid: list[float], dense: float, max_increase: float, attempt: Callable[[float], tuple[float, T]],
                 *, set_name: str, on_point: Callable[[RatioPoint], Any] = lambda p: None) -> RatioChoice[T]:
    """The largest ratio of ``grid`` (ascending) whose perplexity, ``attempt(ratio)[0]``, is at most
    (1 + max_increase)·``dense``, with what its attempt produced. Raises ConfigError when even the smallest ratio
    fails (naming the increase it reached on ``set_name``)."""
    points: dict[float, RatioPoint] = {}
    passing: list[T] = []  # what the largest ratio that passed so far produced (bisection only climbs)

    def passes(r: float) -> bool:
        start = time.perf_counter()
        ppl, produced = attempt(r)
        increase = ppl / dense - 1.0
        points[r] = RatioPoint(r, ppl, increase, bool(increase <= max_increase), time.perf_counter() - start)
        on_point(points[r])
        if points[r].passed:
            passing[:] = [produced]
        return points[r].passed

    lo, hi = 0, len(grid) - 1  # invariant: every index < lo passed, every index > hi failed
    while lo <= hi:
        mid = (lo + hi) // 2
        if passes(grid[mid]):
            lo = mid + 1
        else:
            hi = mid - 1
    if hi < 0:
        p = points[grid[0]]
        raise ConfigError(f"method.auto: even the smallest ratio {grid[0]} raises {set_name} perplexity by "
                          f"{p.increase:+.1%} (limit {max_increase:+.1%}); lower method.auto.min_ratio or "
                          "raise method.auto.max_increase")
    return RatioChoice(grid[hi], list(points.values()), dense, passing[0])
