"""Report rendering from plain dicts, and strict JSON for non-finite perplexities."""

import json
import math

from nesta_ray.report.markdown import before_after_table, json_safe, layer_loss_table, write_json


def test_non_finite_values_become_strings_in_strict_json(tmp_path):
    obj = {"ppl": math.inf, "rows": [1.0, math.nan, {"x": -math.inf}]}
    assert json_safe(obj) == {"ppl": "inf", "rows": [1.0, "nan", {"x": "-inf"}]}
    write_json(str(tmp_path / "r.json"), obj)
    assert json.loads((tmp_path / "r.json").read_text())["ppl"] == "inf"


def test_before_after_table_shows_change_and_non_finite_windows():
    row = lambda p, bad=0: {"perplexity": p, "nonfinite_windows": bad, "windows": 8}  # noqa: E731
    text = before_after_table({"wiki": {"dense": row(20.0), "compressed": row(30.0, bad=1)}})
    assert "| wiki | 20.00 | 30.00 (1 non-finite) | +50.0% | 8 |" in text


def test_layer_loss_table_is_layers_by_projection():
    mods = {"model.layers.0.self_attn.q_proj": {"relative_loss": 0.5},
            "model.layers.1.self_attn.q_proj": {"relative_loss": 0.25},
            "model.layers.1.mlp.down_proj": {"relative_loss": 0.125}}
    lines = layer_loss_table(mods).splitlines()
    assert lines[0] == "| layer | q_proj | down_proj |"
    assert lines[2] == "| 0 | 0.5000 | - |" and lines[3] == "| 1 | 0.2500 | 0.1250 |"
