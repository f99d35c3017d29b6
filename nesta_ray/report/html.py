"""The run report as one self-contained HTML page: tables plus PNG plots embedded as base64 data URIs.

Input is the run report dict the job driver writes as ``report.json`` (run_id, model, method, parameters,
perplexity, timings, fallbacks, modules, optional generation/gate/drift). Every text from the report is
HTML-escaped; the page references no external file, script, font or style sheet. No I/O: the caller writes the
returned string (e.g. ``writer.put_bytes("report.html", page.encode())``).
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from nesta_ray.report.markdown import method_line, parameter_rows
from nesta_ray.report.plots import drift_per_layer, layer_error_heatmap, ratio_vs_perplexity

_STYLE = """body{font-family:sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;height:auto}
.fail{color:#b00020;font-weight:bold}.pass{color:#1b5e20;font-weight:bold}code{background:#f6f6f6}"""


def _text(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(x: Any, digits: int = 2) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return _text("-" if x is None else x)
    if not math.isfinite(v):
        return "-" if math.isnan(v) else str(v)
    if isinstance(x, int) or (v.is_integer() and abs(v) >= 1000):
        return f"{int(v):,}"
    return f"{v:,.{digits}f}" if abs(v) >= 10 ** -digits or v == 0 else f"{v:.{digits}e}"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """An HTML table; every cell is escaped (pass numbers pre-formatted as strings or as numbers)."""
    head = "".join(f"<th>{_text(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_text(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_text(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def layer_error_matrix(modules: Mapping[str, Mapping[str, Any]], order: Sequence[str] = ()
                       ) -> tuple[list[int], list[str], list[list[float]]]:
    """(layers, projections, values (layers, projections)) of ``relative_loss`` from the report's ``modules``
    (names like ``model.layers.3.self_attn.q_proj``); NaN where a layer has no such projection. Projections come
    in ``order`` (e.g. the method's targets), any others after them in order of appearance."""
    cells: dict[tuple[int, str], float] = {}
    projections: list[str] = []
    for name, m in modules.items():
        parts = name.split(".")
        layer, proj = next(int(p) for p in parts if p.isdigit()), parts[-1]
        cells[layer, proj] = float(m["relative_loss"])
        if proj not in projections:
            projections.append(proj)
    layers = sorted({layer for layer, _ in cells})
    projections.sort(key=lambda p: list(order).index(p) if p in order else len(order))
    return layers, projections, [[cells.get((i, p), math.nan) for p in projections] for i in layers]


def report_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The run's own perplexities as ``ratio_vs_perplexity`` rows: dense (if evaluated) and this method."""
    ppl = report.get("perplexity") or {}
    dense = {k: v["dense"]["perplexity"] for k, v in ppl.items() if v.get("dense")}
    rows = [{"method": "dense", "ratio": 0.0, "perplexity": dense}] if dense else []
    return rows + [{"method": report["method"]["name"], "ratio": report["method"]["ratio"],
                    "perplexity": {k: v["compressed"]["perplexity"] for k, v in ppl.items()}}]


def _gate_section(gate: Mapping[str, Any]) -> list[str]:
    verdict = '<p class="pass">passed</p>' if gate["passed"] else '<p class="fail">failed</p>'
    parts = ["<h2>Quality gate</h2>", verdict, f"<p>{_text(gate.get('checks', 0))} checks</p>"]
    if gate.get("failures"):
        parts.append(table(["kind", "name", "detail", "value", "limit"],
                           [[f["kind"], f["name"], f["detail"], _num(f.get("value"), 4), _num(f.get("limit"), 4)]
                            for f in gate["failures"]]))
    return parts


def _modules_table(modules: Mapping[str, Mapping[str, Any]]) -> str:
    return table(["linear", "shape", "rank", "k1", "k2", "relative loss", "fallbacks", "seconds"], [
        [name, "×".join(str(s) for s in m["shape"]), m["rank"], m["k1"], m["k2"], _num(m["relative_loss"], 4),
         sum(m["fallbacks"].values()), _num(m["seconds"], 3)] for name, m in modules.items()])


def render_html(report: Mapping[str, Any], *, sweep_rows: Iterable[Mapping[str, Any]] | None = None,
                drift_runs: Mapping[str, Mapping[int, float]] | None = None,
                drift_threshold: float | None = None) -> str:
    """The report page for ``report`` (see module docstring).

    ``sweep_rows`` (benchmark rows, several methods and ratios) replace the run's own points in the perplexity plot;
    ``drift_runs`` (label -> {layer: score}, e.g. the last nights) replace ``report["drift"]["layers"]`` in the drift
    plot. Raises KeyError when a required report field is missing.
    """
    method, p = report["method"], report["parameters"]
    title = f"nesta_ray run {report['run_id']}"
    parts = [
        f"<h1>{_text(title)}</h1>",
        f"<p>{_text(method_line(method))}; model <code>{_text(report['model']['source'])}</code></p>",
        "<h2>Parameters</h2>",
        table(["scope", "before", "after", "removed"], parameter_rows(p)),
    ]
    if report.get("gate"):
        parts += _gate_section(report["gate"])
    ppl = report.get("perplexity") or {}
    if ppl:
        parts += ["<h2>Perplexity</h2>", table(["set", "dense", "compressed", "non-finite windows", "windows"], [
            [name, _num(r["dense"]["perplexity"]) if r.get("dense") else "-", _num(r["compressed"]["perplexity"]),
             r["compressed"]["nonfinite_windows"], r["compressed"]["windows"]] for name, r in ppl.items()])]
    rows = list(sweep_rows) if sweep_rows is not None else (report_rows(report) if ppl else [])
    if rows:
        parts.append(_img(ratio_vs_perplexity(rows), "perplexity against compression ratio"))
    if report.get("generation"):
        g = report["generation"]
        parts += ["<h2>Greedy sample</h2>", f"<p>prompt: <code>{_text(g['prompt'])}</code></p>",
                  f"<p>compressed: <code>{_text(g['compressed'])}</code></p>"]
    drift = drift_runs if drift_runs is not None else (
        {report["run_id"]: report["drift"]["layers"]} if report.get("drift") else None)
    if drift:
        parts += ["<h2>Drift per layer</h2>", _img(drift_per_layer(drift, threshold=drift_threshold), "drift per "
                                                   "layer")]
    parts += ["<h2>Timings (s)</h2>", table(["step", "seconds"], [[k, _num(v, 1)] for k,
                                                                  v in report["timings"].items()]),
              "<h2>Numerical fallbacks</h2>", table(["kind", "count"], list(report["fallbacks"].items()))]
    if report["modules"]:
        layers, projections, values = layer_error_matrix(report["modules"], method.get("targets") or ())
        parts += ["<h2>Relative whitened loss per layer</h2>",
                  _img(layer_error_heatmap(values, layers, projections), "relative whitened loss per layer"),
                  table(["layer"] + projections, [[layer] + [_num(v, 4) for v in row]
                                                  for layer, row in zip(layers, values)]),
                  "<h2>Linears</h2>", _modules_table(report["modules"])]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_text(title)}</title>'
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
