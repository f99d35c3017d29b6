"""Fault injection for tests: a layer shard's process exits at a chosen phase and layer, a chosen number of times.

Markers written under ``<output>/staging/faults/`` count the deaths across restarts (a restarted process has no
memory), so ``times: 1`` dies once and Ray's restart then succeeds, while ``times`` above the restart budget makes
the shard fail for good.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from nesta_ray.io.storage import join, list_names, put_object

PHASES = ("decompose", "evaluate", "auto_ratio", "sensitivity", "drift")


@dataclass(frozen=True)
class Fault:
    """Exit the shard's process ``times`` times at ``phase`` (decompose: before staging ``layer``; evaluate,
    auto_ratio (an evaluation at a tried ratio), sensitivity (the allocation's dense forward) and drift: when the
    shard reaches ``layer``), counting deaths in
    marker objects under ``markers``."""

    phase: str
    layer: int
    markers: str
    times: int = 1
    storage_options: dict | None = None

    def maybe_fail(self, phase: str, layer: int) -> None:
        """Exit this process (as a crash would) when this fault is due at ``phase`` and ``layer``."""
        if phase != self.phase or layer != self.layer:
            return
        prefix = f"fault-{phase}-{layer}-"
        fired = sum(n.startswith(prefix) for n in list_names(self.markers, self.storage_options))
        if fired < self.times:
            put_object(join(self.markers, f"{prefix}{fired}"), b"", self.storage_options)
            os._exit(1)
