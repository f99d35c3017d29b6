"""House rules on the package's source: small files, functions that fit a screen, short signatures, docstrings on
every public module."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nesta_ray"
SOURCES = sorted(PACKAGE.rglob("*.py"))
MAX_FILE_LINES, MAX_FUNCTION_LINES, MAX_PARAMETERS = 400, 60, 8


def _functions(tree: ast.AST):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _parameters(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    names += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
    return [n for n in names if n not in ("self", "cls")]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_file_function_and_signature_sizes(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_FILE_LINES, f"{path.name}: over {MAX_FILE_LINES} lines"
    tree = ast.parse(text)
    for fn in _functions(tree):
        length = fn.end_lineno - fn.lineno + 1
        assert length <= MAX_FUNCTION_LINES, f"{path.name}:{fn.lineno} {fn.name} has {length} lines"
        params = _parameters(fn)
        assert len(params) <= MAX_PARAMETERS, f"{path.name}:{fn.lineno} {fn.name} takes {len(params)} parameters"
    assert ast.get_docstring(tree), f"{path.name}: no module docstring"
