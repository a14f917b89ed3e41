"""Live per-stage figures in the Dask dashboard and on the workers' Prometheus endpoint.

A stage task creates one ``StageGauges``, installs it on its worker, and calls
``update`` once per step (or more often: an update only stores numbers). Two
readers pull the figures when they want them, so the stage never waits:

- ``Worker.metrics``: distributed calls each entry at every heartbeat and
  ships the result to the scheduler (``WorkerState.metrics``). The dashboard's
  Workers page (``/workers``, bokeh needed) adds every scalar entry it finds
  there as a column of its second worker table: ``pipetrain_stage``,
  ``pipetrain_microbatches_per_s``, ``pipetrain_busy``, ``pipetrain_queued``,
  ``pipetrain_staleness``. That table picks its columns when the page opens:
  reload the page once the job's stages are running.
- Prometheus: the worker's ``/metrics`` handler serves the process-wide
  ``prometheus_client.REGISTRY``. One collector per process, registered on
  first install, yields a gauge per figure labelled by stage and job:
  ``pipetrain_stage_index``, ``pipetrain_stage_microbatches_per_second``,
  ``pipetrain_stage_busy_ratio``, ``pipetrain_stage_queued_microbatches``,
  ``pipetrain_stage_weight_staleness``.

Usage in a stage task::

    with StageGauges(stage=s, job_id=job.job_id).install(get_worker()) as gauges:
        ...
        gauges.update(microbatches_per_s=r, busy=b, queued=q, staleness=v)
"""
from __future__ import annotations

import threading
from typing import Any, Self

# figure: (Worker.metrics key for the dashboard, Prometheus name, help text)
FIGURES = {
    "stage": ("pipetrain_stage", "pipetrain_stage_index", "Pipeline stage index this worker runs"),
    "microbatches_per_s": ("pipetrain_microbatches_per_s", "pipetrain_stage_microbatches_per_second",
                           "Micro-batches through this stage per second (forward and backward done)"),
    "busy": ("pipetrain_busy", "pipetrain_stage_busy_ratio",
             "Share of wall time this stage spent computing (F, B, U) over the last step"),
    "queued": ("pipetrain_queued", "pipetrain_stage_queued_microbatches",
               "Micro-batches received by this stage and not yet processed"),
    "staleness": ("pipetrain_staleness", "pipetrain_stage_weight_staleness",
                  "Weight versions between the latest one and the one the last forward used"),
}
UPDATABLE = tuple(name for name in FIGURES if name != "stage")


class StageGauges:
    """The live figures of one stage on one worker."""

    def __init__(self, *, stage: int, job_id: str = ""):
        if not isinstance(stage, int) or isinstance(stage, bool) or stage < 0:
            raise ValueError(f"stage: must be an integer >= 0, got {stage!r}")
        self.stage, self.job_id = stage, str(job_id)
        # replaced whole on each update: readers on other threads see one consistent set
        self._figures: dict[str, float] = {"stage": float(stage), **{name: 0.0 for name in UPDATABLE}}
        self._worker: Any = None
        self._entries: dict[str, Any] = {}

    # -- the stage's side -------------------------------------------------
    def install(self, worker: Any = None) -> StageGauges:
        """Add the figures to ``worker`` (default: ``distributed.get_worker()``) and its
        process's Prometheus registry."""
        if self._worker is not None:
            raise RuntimeError(f"stage {self.stage}: gauges already installed on {self._worker.address}")
        if worker is None:
            from distributed import get_worker

            worker = get_worker()
        self._worker = worker
        for name, (key, _, _) in FIGURES.items():
            def read(_worker: Any, name: str = name) -> float | int:
                value = self._figures[name]
                return int(value) if name in ("stage", "queued") else value

            self._entries[key] = read
        # A new dict, never a change to the one there: the worker's heartbeat iterates
        # worker.metrics on its event loop while this runs in the stage's thread, and a
        # dict that changes size under it raised there and closed the worker ("worker
        # left the cluster", seen under load in the reliability and cluster tests).
        worker.metrics = {**worker.metrics, **self._entries}
        _registry_collector().add(self)
        return self

    def update(self, **figures: float) -> None:
        """Set any of ``microbatches_per_s``, ``busy`` (0..1), ``queued``, ``staleness``; cheap, thread-safe."""
        unknown = sorted(set(figures) - set(UPDATABLE))
        if unknown:
            raise ValueError(f"stage {self.stage}: unknown figure(s) {unknown}; known: {list(UPDATABLE)}")
        new = dict(self._figures)
        for name, value in figures.items():
            new[name] = float(value)
        self._figures = new

    def uninstall(self) -> None:
        """Remove the figures from the worker and from Prometheus (safe to call twice)."""
        if self._worker is None:
            return
        metrics = self._worker.metrics  # a later stage on this worker may own a key now: keep its
        self._worker.metrics = {key: read for key, read in metrics.items() if self._entries.get(key) is not read}
        self._entries.clear()
        _registry_collector().discard(self)
        self._worker = None

    def figures(self) -> dict[str, float]:
        return dict(self._figures)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()


# --- Prometheus ----------------------------------------------------------------------------------

class _StageCollector:
    """A prometheus_client custom collector over the gauges installed in this process."""

    def __init__(self) -> None:
        self._gauges: set[StageGauges] = set()
        self._lock = threading.Lock()

    def add(self, gauges: StageGauges) -> None:
        with self._lock:
            self._gauges.add(gauges)

    def discard(self, gauges: StageGauges) -> None:
        with self._lock:
            self._gauges.discard(gauges)

    def describe(self) -> list:
        return []  # families come and go with the stages; prometheus_client then calls collect lazily

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        with self._lock:
            snapshot = [(g, g.figures()) for g in self._gauges]
        for name, (_, metric, help_text) in FIGURES.items():
            family = GaugeMetricFamily(metric, help_text, labels=["stage", "job"])
            for gauges, figures in snapshot:
                family.add_metric([str(gauges.stage), gauges.job_id], figures[name])
            yield family


_collector: _StageCollector | None = None
_collector_lock = threading.Lock()


def _registry_collector() -> _StageCollector:
    """This process's collector, registered with prometheus_client's default registry on first use.

    The worker's ``/metrics`` handler serves that registry. Without
    prometheus_client the collector still tracks the gauges; only the
    endpoint is missing (distributed then serves a "not available" page).
    """
    global _collector
    with _collector_lock:
        if _collector is None:
            _collector = _StageCollector()
            try:
                from prometheus_client import REGISTRY
            except ImportError:
                pass
            else:
                REGISTRY.register(_collector)
        return _collector
