"""The module map's one-way imports and third-party boundaries, checked on the source (every import, lazy ones too)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nesta_ray"
# Each module may import only modules listed before it.
ORDER = ["errors", "decompose", "calibration", "models", "storage", "sources", "data", "selection", "requestlogs", "checkpoint", "config",
         "report", "plots", "html_report", "evaluate", "gate", "drift", "metrics", "pipeline.tasks", "pipeline.plan", "pipeline.staging", "pipeline.layerwise", "pipeline.autoratio",
         "pipeline.backends", "pipeline.shard", "pipeline.sharded", "pipeline.reducer", "pipeline.driver", "compress", "nightly"]
# Third-party packages allowed only in these modules.
BOUNDARIES = {"ray": {"metrics", "pipeline.layerwise", "pipeline.sharded", "pipeline.driver"}, "fsspec": {"storage"},
              "transformers": {"sources", "checkpoint", "pipeline.backends", "pipeline.driver", "compress"},
              "deepspeed": {"pipeline.backends"}}
PURE = {"decompose", "calibration"}  # stdlib + torch + errors only


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return ".".join(rel.parts)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}


def test_every_module_is_in_the_map():
    assert set(MODULES) == set(ORDER)


@pytest.mark.parametrize("name", ORDER)
def test_imports_point_only_to_earlier_modules(name):
    earlier = set(ORDER[: ORDER.index(name)])
    for imported in _imports(MODULES[name]):
        if imported.startswith("nesta_ray.") and imported != "nesta_ray":
            target = imported.removeprefix("nesta_ray.")
            assert target in earlier, f"{name} imports {target}, which comes later in the module map"
        top = imported.split(".")[0]
        if top in BOUNDARIES:
            assert name in BOUNDARIES[top], f"{name} imports {top}, allowed only in {sorted(BOUNDARIES[top])}"
        if name in PURE:
            assert top in {"__future__", "math", "dataclasses", "typing", "torch", "nesta_ray"}, f"{name}: {imported}"
