"""PNG plots for run reports: plain data in, PNG bytes out (matplotlib's Agg canvas, no pyplot state, no files).

Non-finite values (a diverged perplexity, a missing layer) are left out of line plots and shown blank in the
heatmap; every function raises ValueError when nothing is left to draw or the shapes disagree.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

DPI = 100


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _finite(x: Any) -> float | None:
    """``x`` as a float if it is a finite number (JSON reports hold "inf"/"nan" as strings), else None."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def ratio_vs_perplexity(rows: Iterable[Mapping[str, Any]], *, title: str = "Perplexity vs compression ratio") -> bytes:
    """One panel per evaluation set: perplexity (log scale) against ratio, one line per method.

    ``rows`` as ``scripts/benchmark_quality.py`` writes them: {"method", "ratio", "perplexity": {set: value}};
    method "dense" is drawn as a dashed horizontal reference. Raises ValueError when no finite value is given.
    """
    points: dict[str, dict[str, list[tuple[float, float]]]] = {}  # set -> method -> [(ratio, ppl)]
    for row in rows:
        for name, value in row["perplexity"].items():
            v = _finite(value)
            if v is not None and v > 0:
                points.setdefault(name, {}).setdefault(row["method"], []).append((float(row["ratio"]), v))
    if not points:
        raise ValueError("ratio_vs_perplexity: no finite perplexity in rows")
    methods = sorted({m for per_set in points.values() for m in per_set if m != "dense"})
    max_ratio = max(r for per_set in points.values() for pts in per_set.values() for r, _ in pts)
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    cols = min(3, len(points))
    nrows = math.ceil(len(points) / cols)
    fig = Figure(figsize=(4.2 * cols + 1.6, 3.4 * nrows + 0.6))
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax, (name, per_method) in zip(axes.flat, points.items()):
        for method, pts in per_method.items():
            if method == "dense":
                ax.axhline(pts[0][1], color="black", linestyle="--", linewidth=1, label="dense")
                continue
            x, y = zip(*sorted(pts))
            ax.plot(x, y, marker="o", color=colors[method], label=method)
        ax.set_yscale("log")
        ax.set_xlim(0, max_ratio * 1.1 + 0.02)  # the dense model sits at ratio 0
        ax.set_title(name)
        ax.set_xlabel("ratio (parameters removed)")
        ax.set_ylabel("perplexity")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes.flat[len(points):]:
        ax.set_visible(False)
    handles = {label: h for ax in axes.flat for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="center right")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1 - 1.4 / (4.2 * cols + 1.6), 1))
    return _png(fig)


def layer_error_heatmap(values: Sequence[Sequence[float]], layers: Sequence[int], projections: Sequence[str], *,
                        title: str = "Relative whitened loss") -> bytes:
    """Heatmap of ``values`` (layers, projections): one row per layer, one column per projection.

    NaN cells (a linear not compressed) are blank; the colour scale is logarithmic when every value is positive.
    Raises ValueError when the shape disagrees with the labels or no value is finite.
    """
    M = np.asarray(values, dtype=np.float64)  # (layers, projections)
    if M.shape != (len(layers), len(projections)):
        raise ValueError(f"layer_error_heatmap: values have shape {M.shape}, labels give "
                         f"({len(layers)}, {len(projections)})")
    finite = M[np.isfinite(M)]
    if finite.size == 0:
        raise ValueError("layer_error_heatmap: no finite value")
    norm = LogNorm(finite.min(), finite.max()) if finite.min() > 0 and finite.max() > finite.min() else None
    fig = Figure(figsize=(2.5 + 0.9 * len(projections), 1.8 + 0.2 * len(layers)))
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(M), aspect="auto", cmap="viridis", norm=norm, interpolation="nearest")
    ax.set_xticks(range(len(projections)), labels=list(projections), rotation=45, ha="right")
    step = max(1, math.ceil(len(layers) / 40))
    ax.set_yticks(range(0, len(layers), step), labels=[str(layers[i]) for i in range(0, len(layers), step)])
    ax.set_xlabel("projection")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return _png(fig)


def drift_per_layer(runs: Mapping[str, Mapping[int, float]], *, threshold: float | None = None,
                    title: str = "Drift per layer") -> bytes:
    """Drift score against layer, one line per run (label -> {layer: score}), with ``threshold`` as a dashed line.

    Raises ValueError when no finite score is given.
    """
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    drawn = 0
    for label, scores in runs.items():
        pts = sorted((int(layer), v) for layer, s in scores.items() if (v := _finite(s)) is not None)
        if pts:
            x, y = zip(*pts)
            ax.plot(x, y, marker=".", label=label)
            drawn += 1
    if not drawn:
        raise ValueError("drift_per_layer: no finite drift score")
    if threshold is not None:
        ax.axhline(threshold, color="red", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    ax.set_xlabel("layer")
    ax.set_ylabel("drift score (0 = unchanged)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    return _png(fig)
