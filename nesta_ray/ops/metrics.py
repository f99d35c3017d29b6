"""Job metrics through ``ray.util.metrics``: one ``JobMetrics`` per job, usable in the driver and inside actors.

Ray exports each metric at every node's Prometheus endpoint (``ray start --metrics-export-port``) as
``ray_<name>``, counters with a ``_total`` suffix, with Ray's own labels (``SessionName``, ``WorkerId``, ...)
added to ours. Every series carries the job's ``job_name``, ``run_id`` and ``model`` tags (not ``job``: Prometheus
sets ``job`` to the scrape job and would rename ours to ``exported_job``); per-layer series add
``layer``, fallbacks add ``kind``. Each process records its own series (Ray's ``WorkerId`` label), so queries sum
counters and take the max of gauges over it (cluster/grafana-dashboard.json does).

Ray must be initialised (driver) or the code must run in a Ray worker: metrics recorded without Ray would be
dropped silently, so ``JobMetrics`` refuses to be created without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import ray
from ray.util.metrics import Counter, Gauge

JOB_TAGS = ("job_name", "run_id", "model")


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its Ray name, kind ("counter" or "gauge"), help text and tags beyond ``JOB_TAGS``."""

    name: str
    kind: str
    description: str
    tags: tuple[str, ...] = ()

    @property
    def exported(self) -> str:
        """The series name at Ray's Prometheus endpoint, e.g. ``ray_nesta_layers_done_total``."""
        return f"ray_{self.name}" + ("_total" if self.kind == "counter" else "")


SPECS = (
    MetricSpec("nesta_layers_total", "gauge", "Decoder layers the job compresses."),
    MetricSpec("nesta_layers_done", "counter", "Decoder layers calibrated, decomposed and staged."),
    MetricSpec("nesta_layer_seconds", "gauge", "Seconds one decoder layer took (calibration + decomposition).",
               ("layer",)),
    MetricSpec("nesta_whitened_loss", "gauge", "Relative whitened loss of a layer (mean over its linears).",
               ("layer",)),
    MetricSpec("nesta_fallbacks", "counter", "Numerical fallbacks (damping escalations, eigen fallbacks, clamps).",
               ("kind",)),
    MetricSpec("nesta_bytes_written", "counter", "Bytes written to the output storage."),
    MetricSpec("nesta_drift_score", "gauge", "Drift of a layer against the previous run (0 = unchanged).",
               ("layer",)),
    MetricSpec("nesta_gate_passed", "gauge", "Quality gate of the run: 1 passed, 0 failed."),
    MetricSpec("nesta_run_seconds", "gauge", "Wall-clock seconds of the whole run."),
)
EXPORTED_NAMES = tuple(s.exported for s in SPECS)


class JobMetrics:
    """The metrics of one job, tagged with its job name, run id and model.

    Picklable: pass it to Ray actors or tasks and record there (the metric objects are re-created on the worker).
    Raises RuntimeError when created outside a Ray driver or worker.
    """

    def __init__(self, job_name: str, run_id: str, model: str) -> None:
        if not ray.is_initialized():
            raise RuntimeError("JobMetrics needs Ray: call ray.init() (the job driver's ensure_ray) before creating it")
        self.tags = {"job_name": job_name, "run_id": run_id, "model": model}
        self._counters = {s.name: Counter(s.name, s.description, JOB_TAGS + s.tags)
                          for s in SPECS if s.kind == "counter"}
        self._gauges = {s.name: Gauge(s.name, s.description, JOB_TAGS + s.tags) for s in SPECS if s.kind == "gauge"}

    def _tags(self, **extra: str) -> dict[str, str]:
        return {**self.tags, **extra}

    def layers_total(self, n: int) -> None:
        """Set the number of layers this job compresses."""
        self._gauges["nesta_layers_total"].set(int(n), self._tags())

    def layer_done(self, layer: int, seconds: float, whitened_loss: float, fallbacks: Mapping[str, int]) -> None:
        """Record a finished layer: its time, relative whitened loss and fallback counts per kind (zeros skipped)."""
        layer_tag = str(layer)
        self._counters["nesta_layers_done"].inc(1, self._tags())
        self._gauges["nesta_layer_seconds"].set(float(seconds), self._tags(layer=layer_tag))
        self._gauges["nesta_whitened_loss"].set(float(whitened_loss), self._tags(layer=layer_tag))
        for kind, count in fallbacks.items():
            if count:
                self._counters["nesta_fallbacks"].inc(int(count), self._tags(kind=kind))

    def bytes_written(self, n: int) -> None:
        """Add ``n`` bytes written to the output storage (0 is ignored)."""
        if n:
            self._counters["nesta_bytes_written"].inc(int(n), self._tags())

    def drift(self, layer: int, score: float) -> None:
        """Set the drift score of ``layer`` against the previous run."""
        self._gauges["nesta_drift_score"].set(float(score), self._tags(layer=str(layer)))

    def gate(self, passed: bool) -> None:
        """Record the quality gate's result."""
        self._gauges["nesta_gate_passed"].set(1 if passed else 0, self._tags())

    def run_finished(self, seconds: float) -> None:
        """Record the run's wall-clock duration."""
        self._gauges["nesta_run_seconds"].set(float(seconds), self._tags())
