"""Loading a job configuration: YAML files, dotted ``--set`` overrides, and one-line errors naming the field.

Errors name the field path and the fix, e.g. ``method.ratio: must be < 1 (got 1.5); fraction of the compressed
linears' parameters to remove, in [0, 1)``.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from nesta_ray.config.schema import JobConfig
from nesta_ray.errors import ConfigError


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``key.path=value`` overrides (value parsed as YAML; a numeric part indexes a list, e.g.
    ``evaluation.sets.0.num_windows=4``) to a copy of a raw config dict. ConfigError if malformed."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"--set {item!r}: expected key.path=value, e.g. --set method.ratio=0.3")
        node: Any = raw
        for depth, name in enumerate(parts):
            last = depth == len(parts) - 1
            part: str | int = name
            if isinstance(node, list):
                if not name.isdigit() or int(name) >= len(node):
                    raise ConfigError(f"--set {key}: {'.'.join(parts[:depth])} is a list of {len(node)} items; "
                                      f"use an index 0..{len(node) - 1}")
                part = int(name)
            elif not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {'.'.join(parts[:depth])} is a value, not a section")
            if last:
                node[part] = yaml.safe_load(value) if value else None
            else:
                if not isinstance(node, list) and not isinstance(node.get(part), (dict, list)):
                    node[part] = {}
                node = node[part]
    return raw


def load_config(path: str | None, overrides: Sequence[str] = ()) -> JobConfig:
    """Validated JobConfig from a YAML file plus overrides. Raises ConfigError naming the field and the fix."""
    raw: dict = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}".replace("\n", " ")) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (model, method, calibration, ...)")
    return validate(apply_overrides(raw, list(overrides)))


def validate(raw: dict) -> JobConfig:
    """JobConfig from a raw dict; the first problem becomes a one-line ConfigError."""
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err.errors()[0], raw)) from None


def _describe(error: Any, raw: dict) -> str:
    loc = [str(p) for p in error["loc"]]
    where = ".".join(loc) or "config"
    if error["type"] == "extra_forbidden":
        model = _model_at(loc[:-1])
        known = sorted(model.model_fields) if model else []
        close = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f"did you mean {'.'.join(loc[:-1] + close)}?" if close else f"known keys here: {', '.join(known)}"
        return f"{where}: unknown key; {hint}"
    if error["type"] == "missing":
        return f"{where}: required field is missing; {_help(loc) or 'add it to the config'}"
    got = error.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    help_text = _help(loc)
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}: {message}{shown}" + (f"; {help_text}" if help_text else "")


def _model_at(loc: list[str]) -> type[BaseModel] | None:
    model: Any = JobConfig
    for part in loc:
        if part.isdigit():
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        model = next((a for a in (annotation, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return None
    return model


def _help(loc: list[str]) -> str:
    parent = _model_at(loc[:-1])
    field = parent.model_fields.get(loc[-1]) if parent and loc else None
    return field.description or "" if field else ""
