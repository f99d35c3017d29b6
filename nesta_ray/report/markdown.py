"""Run reports: markdown tables from plain result dicts, and JSON writing. No computation, no model code."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from nesta_ray.method.decompose import is_nested


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:,.2f}" if abs(x) < 1e5 else f"{x:,.0f}"


def table(header: list[str], rows: Iterable[list[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def perplexity_table(results: dict[str, list]) -> str:
    """Rows per evaluation set, one column per model label; ``results`` maps label -> list of Perplexity."""
    labels = list(results)
    names = [r.name for r in next(iter(results.values()))]
    rows = []
    for i, name in enumerate(names):
        cells = [results[label][i] for label in labels]
        shown = [_fmt(c.perplexity) + (f" ({c.nonfinite_windows} non-finite)" if c.nonfinite_windows else "")
                 for c in cells]
        rows.append([name, *shown, cells[0].windows])
    return table(["set"] + labels + ["windows"], rows)


def before_after_table(perplexity: dict[str, dict[str, dict]]) -> str:
    """Perplexity per set: dense, compressed and the change; ``perplexity`` maps set -> {"dense", "compressed"}."""
    rows = []
    for name, r in perplexity.items():
        dense, comp = r.get("dense"), r["compressed"]
        change = (comp["perplexity"] / dense["perplexity"] - 1) * 100 if dense else float("nan")
        flag = f" ({comp['nonfinite_windows']} non-finite)" if comp["nonfinite_windows"] else ""
        rows.append([name, _fmt(dense["perplexity"]) if dense else "-", _fmt(comp["perplexity"]) + flag,
                     f"{change:+.1f}%" if dense else "-", comp["windows"]])
    return table(["set", "dense", "compressed", "change", "windows"], rows)


def layer_loss_table(modules: dict[str, dict]) -> str:
    """Relative whitened loss per decoder layer (rows) and projection (columns)."""
    grid: dict[int, dict[str, float]] = defaultdict(dict)
    columns: list[str] = []
    for name, m in modules.items():
        parts = name.split(".")
        layer = next(int(p) for p in parts if p.isdigit())
        col = parts[-1]
        grid[layer][col] = m["relative_loss"]
        if col not in columns:
            columns.append(col)
    rows = [[layer] + [f"{grid[layer][c]:.4f}" if c in grid[layer] else "-" for c in columns] for layer in sorted(grid)]
    return table(["layer"] + columns, rows)


def method_line(method: dict) -> str:
    """One line naming the method, target ratio and, for nested methods, the k1 rule (report["method"])."""
    line = f"method {method['name']}, target ratio {method['ratio']}"
    if not is_nested(str(method["name"])):
        return line
    tol = method.get("k1_tolerance")
    if tol is not None:
        return f"{line}, k1 per matrix: the smallest whose whitened loss is within {tol:.0%} of rank k's"
    return f"{line}, k1 = {method.get('k1_fraction')}·k"


def parameter_rows(p: dict) -> list[list[str]]:
    """Rows (scope, before, after, removed) of report["parameters"]."""
    return [[scope, f"{p[before]:,}", f"{p[after]:,}", f"{1 - p[after] / p[before]:.1%}"]
            for scope, before, after in [("compressed linears", "linears_before", "linears_after"),
                                         ("whole model", "model_before", "model_after")]]


def allocation_text(a: dict) -> str:
    """report["allocation"] as a sentence and a table per linear type."""
    staged = ", taken from the stage" if a["reused_from_stage"] else ""
    head = (f"by measured sensitivity ({a['windows']} windows{staged}): {a['dense']} of {a['linears']} linears kept "
            f"dense; {a['params']:,} parameters for the uniform ranks' {a['budget']:,}")
    rows = [[t, r["linears"], r["dense"], r["uniform_rank"], "-" if r["mean_rank"] is None else f"{r['mean_rank']:.1f}",
             "-" if r["min_rank"] is None else f"{r['min_rank']}–{r['max_rank']}"] for t, r in a["by_type"].items()]
    return head + "\n\n" + table(["linear", "count", "dense", "uniform rank", "mean rank", "ranks"], rows)


def run_markdown(report: dict) -> str:
    """The run report as markdown: parameters, perplexity before/after, timings, fallbacks, per-layer loss."""
    p = report["parameters"]
    parts = [
        f"# nesta_ray run {report['run_id']}",
        f"{method_line(report['method'])}; model `{report['model']['source']}`",
        "## Parameters",
        table(["scope", "before", "after", "removed"], parameter_rows(p)),
    ]
    if report.get("perplexity"):
        parts += ["## Perplexity", before_after_table(report["perplexity"])]
    if report.get("auto_ratio"):
        a = report["auto_ratio"]
        parts += ["## Automatic ratio",
                  f"chose **{a['ratio']}**: the largest ratio tried keeping `{a['set']}` within "
                  f"+{a['max_increase']:.1%} "
                  f"of dense ({a['dense_perplexity']:.2f})",
                  table(["ratio", "perplexity", "increase", "passed", "seconds"],
                        [[p["ratio"], f"{p['perplexity']:.2f}", f"{p['increase']:+.1%}", "yes" if p["passed"] else "no",
                          f"{p['seconds']:.1f}"] for p in a["points"]])]
    if report.get("allocation"):
        parts += ["## Rank allocation", allocation_text(report["allocation"])]
    if report.get("gate"):
        g = report["gate"]
        verdict = "passed: published (latest moved)" if g["passed"] else "FAILED: not published (latest unchanged)"
        parts += ["## Quality gate", f"{verdict}; {g['checks']} checks"]
        if g["failures"]:
            parts.append(table(["kind", "name", "failure"], [[f["kind"], f["name"],
                                                              f["detail"]] for f in g["failures"]]))
    if report.get("warnings"):
        parts += ["## Warnings", "\n".join(f"- {w}" for w in report["warnings"])]
    if report.get("skipped_records"):
        parts += ["## Records skipped while reading text",
                  table(["source", "reason", "records"], [[src, reason, n] for src, counts in
                                                          report["skipped_records"].items()
                                                          for reason, n in counts.items()])]
    if report.get("text_sources"):
        parts += ["## Text from registry packages",
                  table(["source", "packages", "licence", "notice"],
                        [[src, "; ".join(s["packages"]), s["licence"], s["notice"]]
                         for src, s in report["text_sources"].items()])]
    if report.get("generation"):
        g = report["generation"]
        parts += ["## Greedy sample", f"prompt: `{g['prompt']}`", f"compressed: `{g['compressed']}`"]
    parts += ["## Timings (s)", table(list(report["timings"]), [[f"{v:.1f}" for v in report["timings"].values()]])]
    parts += ["## Numerical fallbacks", table(list(report["fallbacks"]), [list(report["fallbacks"].values())])]
    parts += ["## Relative whitened loss per layer", layer_loss_table(report["modules"])]
    return "\n\n".join(parts) + "\n"


def total_fallbacks(counts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """Numerical fallback counts by kind, summed over linears (one kind -> count mapping each)."""
    total: dict[str, int] = {}
    for fallbacks in counts:
        for kind, n in fallbacks.items():
            total[kind] = total.get(kind, 0) + n
    return total


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by the string "inf", "-inf" or "nan" (strict JSON has none)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as indented strict JSON (non-finite floats as strings), creating parent folders."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(json_safe(obj), indent=2, allow_nan=False, default=str) + "\n")
