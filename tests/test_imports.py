"""The module map's one-way imports and third-party boundaries, checked on the source (every import, lazy ones too,
``from nesta_ray import x`` and relative imports included)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nesta_ray"
# The floors, bottom up: each module may import only modules listed before it.
ORDER = [
    "errors", "redaction",
    # pure math: the method
    "method.tensors", "method.guards", "method.ranks", "method.whitening", "method.factorize", "method.anchored",
    "method.decompose", "method.drift", "method.allocation",
    # the model's structure and calibration
    "model.arch", "model.layers", "model.lowrank_linear", "model.lowrank", "model.modeling_nesta_lowrank",
    "model.registration", "model.precision", "model.calibration", "model.cross_calibration", "model.sensitivity",
    # configuration and the plan
    "config.validators", "config.method_section", "config.schema", "config.loading", "plan.linears", "plan.sizing", "plan.rates", "plan.timing",
    # model and data I/O
    "io.storage", "io.weights", "io.sources", "io.packages", "data.corpora", "data.text", "data.selection",
    "data.requestlogs", "data.windows",
    # the checkpoint
    "checkpoint.layout", "checkpoint.runs", "checkpoint.meta", "checkpoint.stage", "checkpoint.writer",
    "checkpoint.reader",
    # reports and operations on a model
    "report.markdown", "report.plots", "report.html", "ops.evaluation", "ops.gate", "ops.ratio_search", "ops.metrics",
    "ops.lmeval", "ops.rates_probe",
    # the pipeline
    "pipeline.preflight", "pipeline.ray_env", "pipeline.tasks", "pipeline.precision", "pipeline.uploads",
    "pipeline.embedded",
    "pipeline.layer_host", "pipeline.backends", "pipeline.faults", "pipeline.shard_weights", "pipeline.shard_worker",
    "pipeline.shard_group", "pipeline.runner",
    "pipeline.autoratio", "pipeline.rank_allocation", "pipeline.progress", "pipeline.context", "pipeline.job_output", "pipeline.drift_scoring",
    "pipeline.job", "pipeline.dry_run", "pipeline.nightly",
    # entry points
    "cli", "compress", "evaluate", "nightly", "lmeval",
]
PACKAGES = {"method", "model", "config", "plan", "io", "data", "checkpoint", "report", "ops", "pipeline"}
# Third-party packages allowed only in these modules.
BOUNDARIES = {"ray": {"ops.metrics", "pipeline.ray_env", "pipeline.embedded", "pipeline.shard_group"},
              "fsspec": {"io.storage"},
              # the Hugging Face classes of a compressed model, their registration, and where models are loaded
              "transformers": {"model.modeling_nesta_lowrank", "model.registration", "io.sources",
                               "checkpoint.reader", "pipeline.backends", "pipeline.dry_run"},
              "deepspeed": {"pipeline.backends"},
              "lm_eval": {"ops.lmeval", "lmeval"}}
PURE = {m for m in ORDER if m.startswith("method.")}  # stdlib + torch (+ numpy for transport) + errors only
PURE_ALLOWED = {"__future__", "math", "dataclasses", "typing", "collections", "heapq", "torch", "numpy",
                "nesta_ray"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return ".".join(rel.parts)


def _imports(path: Path, module: str) -> set[str]:
    """Every module ``module`` imports, absolute: ``from nesta_ray import x`` names nesta_ray.x, relative imports
    are resolved against the module's package."""
    names = set()
    package = module.rsplit(".", 1)[0] if "." in module else ""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = ["nesta_ray", *package.split(".")] if package else ["nesta_ray"]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            names.add(base)
            if base == "nesta_ray" or base.removeprefix("nesta_ray.") in PACKAGES:
                names |= {f"{base}.{a.name}" for a in node.names}
    return names


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}


def test_every_module_is_in_the_map():
    assert set(MODULES) == set(ORDER)


def test_package_inits_hold_no_code():
    for init in PACKAGE.rglob("__init__.py"):
        if init.parent == PACKAGE:
            continue
        body = [n for n in ast.parse(init.read_text()).body if not isinstance(n, ast.Expr)]
        assert not body, f"{init.relative_to(PACKAGE)} holds code; put it in a module of the map"


@pytest.mark.parametrize("name", ORDER)
def test_imports_point_only_to_earlier_modules(name):
    earlier = set(ORDER[: ORDER.index(name)])
    for imported in _imports(MODULES[name], name):
        if imported.startswith("nesta_ray."):
            target = imported.removeprefix("nesta_ray.")
            if target in PACKAGES or target == "__version__":
                continue  # a package (its __init__ holds only a docstring) or the version the root defines
            assert target in earlier, f"{name} imports {target}, which comes later in the module map"
        top = imported.split(".")[0]
        if top in BOUNDARIES:
            assert name in BOUNDARIES[top], f"{name} imports {top}, allowed only in {sorted(BOUNDARIES[top])}"
        if name in PURE:
            assert top in PURE_ALLOWED, f"{name}: {imported}"


def test_the_checker_sees_every_import_form(tmp_path):
    """``from nesta_ray import x`` and relative imports are resolved (a violation in those forms must not pass)."""
    src = tmp_path / "m.py"
    src.write_text("from nesta_ray import nightly\nfrom ..pipeline import job\nfrom . import tasks\n"
                   "from .backends import BackendSpec\n")
    found = _imports(src, "pipeline.embedded")
    assert {"nesta_ray.nightly", "nesta_ray.pipeline.job", "nesta_ray.pipeline.tasks",
            "nesta_ray.pipeline.backends"} <= found
