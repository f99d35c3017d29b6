"""Secrets and long values kept out of every message and report: the one place that decides what is shown.

Three rules. Every text a CLI prints (error lines, the plan, the run's summary) goes through ``redact``: the
userinfo of a URI (``s3://KEY:SECRET@bucket/...`` -> ``s3://***@bucket/...``) is replaced, and so is every value
found under a ``storage_options`` mapping of the config (``secrets_of``) and the value of every environment variable
whose name says it holds a secret (``*SECRET*``, ``*TOKEN*``, ``*PASSWORD*``, ``*ACCESS_KEY*``, ...), when at least
8 characters long. Every report written (report.json/md/html, night records) goes through ``redact_obj``: URI
userinfo replaced, every value under a ``storage_options`` key replaced. ``shown`` caps a value echoed back in a
message (a 5 KB line comes back as its first 80 characters and its length). Storage endpoints (``endpoint_url``)
and regions are not secrets: messages name them as the thing to fix, with their userinfo removed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

HIDDEN = "***"
MAX_SHOWN = 80  # characters of an echoed value
MAX_LINE = 2000  # characters of a whole message line, whatever it echoes
_MIN_SECRET = 8  # shorter values (true, 10, testing) would blank ordinary words; real keys are longer
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/@\s'\"]+)@")
_SECRET_ENV = re.compile(r"SECRET|TOKEN|PASSW|CREDENTIAL|ACCESS_KEY|API_KEY|PRIVATE|SESSION", re.IGNORECASE)
_NOT_SECRET = {"endpoint_url", "region_name", "region", "anon", "use_ssl", "asynchronous"}


def strip_userinfo(text: str) -> str:
    """``text`` with the userinfo of every URI in it (``scheme://user:password@``) replaced by ``***``."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{HIDDEN}@", text)


def secrets_of(raw: Any) -> set[str]:
    """Every value under a ``storage_options`` key anywhere in ``raw`` (a config dict, a pydantic dump), as text,
    except endpoints and regions (``_NOT_SECRET``), plus the secret-looking environment variables' values."""
    found: set[str] = set(env_secrets())

    def walk(node: Any, inside: bool, key: str) -> None:
        if isinstance(node, str):  # credentials written into a URI, wherever it is quoted later (a bucket name)
            for m in _USERINFO.finditer(node):
                found.update(p for p in (m["userinfo"], *m["userinfo"].split(":")) if len(p) >= _MIN_SECRET)
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, inside or k == "storage_options", str(k))
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v, inside, key)
        elif inside and node is not None and key not in _NOT_SECRET and len(str(node)) >= _MIN_SECRET:
            found.add(str(node))

    walk(raw, False, "")
    return found


def env_secrets() -> set[str]:
    """Values of the environment variables whose names say they hold a secret (at least 8 characters long)."""
    return {v for k, v in os.environ.items() if _SECRET_ENV.search(k) and len(v) >= 8}


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with URI userinfo, the given ``secrets`` and the environment's secrets replaced by ``***``
    (longest first, so a secret that contains another is hidden whole)."""
    text = strip_userinfo(text)
    for secret in sorted({*secrets, *env_secrets()}, key=len, reverse=True):
        if len(secret) >= _MIN_SECRET:
            text = text.replace(secret, HIDDEN)
    return text


def redact_obj(obj: Any) -> Any:
    """A copy of a JSON-like ``obj`` (a report: dicts, lists, scalars) with the userinfo of every URI in its strings
    replaced and every value under a ``storage_options`` key replaced by ``***`` (its keys stay)."""
    if isinstance(obj, Mapping):
        return {k: ({kk: HIDDEN for kk in v} if k == "storage_options" and isinstance(v, Mapping)
                    else HIDDEN if k == "storage_options" else redact_obj(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v) for v in obj]
    return strip_userinfo(obj) if isinstance(obj, str) else obj


def shown(value: Any, limit: int = MAX_SHOWN) -> str:
    """``repr(value)`` for a message, userinfo stripped, cut to ``limit`` characters with the full length noted."""
    text = strip_userinfo(repr(value))
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def error_line(err: BaseException, secrets: Iterable[str] = ()) -> str:
    """The one line a CLI prints for ``err``: ``error: <message>``, on one line, redacted, at most ``MAX_LINE``
    characters."""
    text = redact(" ".join(str(err).split()), secrets)
    if len(text) > MAX_LINE:
        text = f"{text[:MAX_LINE]}... ({len(text)} characters)"
    return f"error: {text}"
