"""Loading a job configuration: YAML files, dotted ``--set`` overrides, and one-line errors naming the field.

Errors name the field path and the fix, e.g. ``method.ratio: must be < 1 (got 1.5); fraction of the compressed
linears' parameters to remove, in [0, 1)``. Values echoed back are capped (``redaction.shown``) and never shown
for a field under ``storage_options``. YAML is read with YAML 1.2's floats (``1e-1`` is a number, as ``0.1`` is;
PyYAML's YAML 1.1 rules would make it a string) and a key given twice in one mapping is refused.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from nesta_ray.config.schema import JobConfig
from nesta_ray.errors import ConfigError
from nesta_ray.redaction import HIDDEN, secrets_of, shown, strip_userinfo

_MAX_PART = 60  # characters of one key of a field path in a message
_MAX_MESSAGE = 300  # characters of a validator's message (it may quote values)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats (``1e-1``, ``2E5``: numbers, not strings) and duplicate mapping keys
    refused."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {shown(key)} appears twice in one mapping (line {line}): keep one",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(  # what YAML 1.1 leaves out: an exponent without a dot or without a sign
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    """``text`` parsed as YAML by ``_Loader``. Raises yaml.YAMLError."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``key.path=value`` overrides (value parsed as YAML; a numeric part indexes a list, e.g.
    ``evaluation.sets.0.num_windows=4``) to a copy of a raw config dict. ConfigError if malformed."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        secret = "storage_options" in parts
        key = key if len(key) <= _MAX_PART else f"{key[:_MAX_PART]}..."
        if not sep or not all(parts):
            raise ConfigError(f"--set {shown(key)}: expected key.path=value, e.g. --set method.ratio=0.3")
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
                node[part] = _override_value(key, value, secret)
            else:
                if not isinstance(node, list) and not isinstance(node.get(part), (dict, list)):
                    node[part] = {}
                node = node[part]
    return raw


def _override_value(key: str, value: str, secret: bool) -> Any:
    """The YAML value of ``--set key=value`` (None when empty). Raises ConfigError when it is not valid YAML."""
    if not value:
        return None
    try:
        return parse_yaml(value)
    except yaml.YAMLError as err:
        what = HIDDEN if secret else shown(value)
        raise ConfigError(f"--set {key}: the value {what} is not valid YAML ({_yaml_problem(err)}); close its "
                          f"brackets or quote it (--set '{key}=\"...\"')") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """Where and what a YAML error is, without the snippet of the line (it could hold a secret)."""
    problem = getattr(err, "problem", None) or getattr(err, "context", None) or type(err).__name__
    mark = getattr(err, "problem_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else str(problem)


def read_raw(path: str) -> dict:
    """The raw mapping of a YAML config file. Raises ConfigError naming the file and what is wrong with it."""
    try:
        raw = parse_yaml(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory: name a YAML file (see configs/)") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                          f"{err.start}): name a YAML file (see configs/)") from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read ({err.strerror or type(err).__name__}): check its "
                          "permissions") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (model, method, calibration, ...)")
    return raw


def load_config(path: str | None, overrides: Sequence[str] = (), secrets: set[str] | None = None) -> JobConfig:
    """Validated JobConfig from a YAML file plus overrides. ``secrets``, when given, receives the config's secret
    values (``redaction.secrets_of``) before validation, so that even an invalid config's error can be redacted.
    Raises ConfigError naming the field and the fix."""
    raw = apply_overrides(read_raw(path) if path is not None else {}, list(overrides))
    if secrets is not None:
        secrets.update(secrets_of(raw))
    return validate(raw)


def validate(raw: dict) -> JobConfig:
    """JobConfig from a raw dict; the first problem becomes a one-line ConfigError."""
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err.errors()[0], raw)) from None


def _describe(error: Any, raw: dict) -> str:
    """One line for a pydantic error: the field path, the problem, the value (capped; hidden under
    storage_options) and the field's help."""
    loc = [str(p) if len(str(p)) <= _MAX_PART else f"{str(p)[:_MAX_PART]}..." for p in error["loc"]]
    where = strip_userinfo(".".join(loc) or "config")
    if error["type"] == "extra_forbidden":
        model = _model_at(loc[:-1])
        known = sorted(model.model_fields) if model else []
        close = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f"did you mean {'.'.join(loc[:-1] + close)}?" if close else f"known keys here: {', '.join(known)}"
        return f"{where}: unknown key; {hint}"
    if error["type"] == "missing":
        return f"{where}: required field is missing; {_help(loc) or 'add it to the config'}"
    got = error.get("input")
    secret = "storage_options" in loc
    echo = "" if isinstance(got, dict) else f" (got {HIDDEN})" if secret else f" (got {shown(got)})"
    help_text = _help(loc)
    message = strip_userinfo(error["msg"].removeprefix("Value error, "))
    if len(message) > _MAX_MESSAGE:
        message = f"{message[:_MAX_MESSAGE]}... ({len(message)} characters)"
    return f"{where}: {message}{echo}" + (f"; {help_text}" if help_text else "")


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
