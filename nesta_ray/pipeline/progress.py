"""The job's progress display on stderr (rich), off with ``runtime.progress: false``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


@contextmanager
def progress_bars(enabled: bool) -> Iterator[Progress]:
    """Progress bars on stderr (disabled ones accept every call and draw nothing)."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=Console(stderr=True), disable=not enabled) as progress:
        yield progress
