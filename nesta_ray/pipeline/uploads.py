"""Staging uploads in the background: a finished layer's factors go to the stage while the next layer is
calibrated or decomposed, instead of the device waiting on object storage.

At most one upload is in flight: ``submit`` first waits for the previous one, so a layer is staged before the
next may fail (a worker dying mid-layer loses only that layer, as with synchronous writes) and memory holds at
most one layer's bytes on their way out. An upload's error is raised by the next ``submit`` or ``wait``, never
dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class BackgroundUploads:
    """One background thread running one upload at a time."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nesta-stage")
        self._pending: Future[Any] | None = None

    def submit(self, upload: Callable[..., Any], *args: Any) -> None:
        """Run ``upload(*args)`` in the background once the previous upload has finished. Raises what the
        previous upload raised."""
        self.wait()
        self._pending = self._pool.submit(upload, *args)

    def wait(self) -> None:
        """Return once nothing is in flight. Raises what the last upload raised."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()
