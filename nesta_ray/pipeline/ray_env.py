"""Ray for the pipeline: connect or start it, and fetch results so that only nesta_ray errors reach the user."""

from __future__ import annotations

import os
import warnings
from typing import Any

import ray

from nesta_ray.errors import NestaError, PipelineError


def ensure_ray(address: str | None, num_cpus: int | None) -> None:
    """Connect to ``address`` (or $RAY_ADDRESS); without either, start a local Ray bound to this machine."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local, loopback-only: no token to hand around
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)


def cluster_gpu_kinds() -> list[str] | None:
    """The GPU kinds of the connected cluster (Ray's ``accelerator_type:*`` resources; ["unknown"] when it has
    GPUs but names no kind), or None when it has no GPU. Ray must be initialised."""
    resources = ray.cluster_resources()
    if not resources.get("GPU"):
        return None
    return sorted(k.removeprefix("accelerator_type:") for k in resources if k.startswith("accelerator_type:")) or [
        "unknown"]


def actor_restarted() -> bool:
    """Whether this process is a Ray actor that Ray restarted after its process died (False outside an actor)."""
    if not ray.is_initialized():
        return False
    context = ray.get_runtime_context()
    if context.get_actor_id() is None:
        return False
    with warnings.catch_warnings():  # the property itself calls a deprecated Ray accessor
        warnings.simplefilter("ignore", DeprecationWarning)
        return bool(context.was_current_actor_reconstructed)


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def fetch(refs: Any, what: str, fix: str = "") -> Any:
    """``ray.get(refs)``; a nesta_ray error raised inside a task or actor is re-raised as itself (rerunning would
    not help), any other failure as a one-line PipelineError naming ``what`` failed, the underlying error and
    ``fix``."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, NestaError):
            raise cause from None
        inner = cause if isinstance(cause, BaseException) else err
        raise PipelineError(f"{what} failed ({type(inner).__name__}: {first_line(inner)})"
                            + (f"; {fix}" if fix else "")) from None
