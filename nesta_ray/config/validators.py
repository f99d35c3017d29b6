"""What the schema's sections share: their base model (``Strict``: unknown keys rejected, frozen) and field
validators for paths and URIs that must not be empty nor carry credentials, storage options that a local path
would ignore, evaluation-set names that must be unique.

Each is a plain function wrapped by ``field_validator`` in the section that uses it (``config.schema``); each raises
ValueError, which ``config.loading`` turns into one line naming the field.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

# Object stores whose URIs have no userinfo: s3fs reads s3://KEY:SECRET@bucket as a bucket named "KEY:SECRET@bucket".
_CREDENTIALS_IN_URI = re.compile(r"(s3|s3a|gs|gcs|abfs|abfss|az|adl|oss)://[^/@]*@")
# What fsspec's local filesystem takes; any other storage option on a local path would be ignored without a word.
LOCAL_OPTIONS = {"auto_mkdir", "skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths"}


class Strict(BaseModel):
    """The base of every config section: unknown keys rejected, values frozen, no inf or nan."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def is_local(uri: str) -> bool:
    """A local path, file:// URI or registry name (pypi:/debian:), as opposed to a remote fsspec URI."""
    return "://" not in uri or uri.startswith("file://")


def non_empty(value: str | None) -> str | None:
    """Raise ValueError for an empty or blank path (it would resolve to the current directory), or an object-store
    URI with credentials in it (s3fs would take them for part of the bucket name, and echo them)."""
    if value is not None and not value.strip():
        raise ValueError("must not be empty: give a path or URI")
    if value is not None and _CREDENTIALS_IN_URI.match(value):
        raise ValueError("an object-store URI takes no credentials (user:secret@): give them as storage_options "
                         "key and secret, or in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)")
    return value


def local_options(uri_field: str) -> Any:
    """A validator of ``storage_options``: ValueError for options that the local path in field ``uri_field`` (declared
    before it) would silently ignore."""

    def check(options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        uri = info.data.get(uri_field)
        if isinstance(uri, str) and is_local(uri) and (unknown := sorted(set(options) - LOCAL_OPTIONS)):
            raise ValueError(f"{str(unknown[0])[:40]!r} is not an option of a local path ({uri_field} {uri[:80]} is "
                             f"local and takes only {', '.join(sorted(LOCAL_OPTIONS))}): remove it, or give "
                             f"{uri_field} as a remote URI (s3://...)")
        return options

    return field_validator("storage_options")(check)


def unique_names(sets: list[Any]) -> list[Any]:
    """Raise ValueError when two evaluation sets share a name (results, gates and method.auto find a set by it)."""
    names = [s.name for s in sets]
    if twice := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"set name {twice[0][:80]!r} is used twice; results, gates and method.auto find a set by its "
                         "name: give each set its own name")
    return sets
