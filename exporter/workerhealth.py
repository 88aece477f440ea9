"""The worker's tracking health (store failures, buffered, dropped, replayed, adopted writes) as metrics.

A worker in its own container reports it over OTLP (`POST /v1/metrics` on the receiver); a worker
in this process (`up`) is read directly at scrape time. Either way each worker process is one
`worker` label value; a reporting worker that falls silent for `expiry` seconds is dropped, so
restarts and scale-downs do not pile up series.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter import metrics as m
from jobs import telemetry as attr

log = logging.getLogger(__name__)
# Well past a few export intervals (10 s by default), short enough that a gone worker's series end.
EXPIRY_SECONDS = 600.0
# The receiver is on loopback or behind a token; still, a misbehaving sender must not grow the
# exposition without bound.
MAX_WORKERS = 64
# Counts above 2**53 lose precision as floats and no tracker gets near them.
_MAX_VALUE = float(2**53)
Reader = Callable[[], Mapping[str, int]]


class WorkerHealth(Collector):
    """Serves embedding_worker_tracking_* families from worker reports and in-process readers."""

    def __init__(
        self,
        registry: CollectorRegistry | None,
        *,
        expiry: float = EXPIRY_SECONDS,
        max_workers: int = MAX_WORKERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.expiry = expiry
        self.clock = clock
        self.max_workers = max_workers
        self._reports: dict[str, tuple[float, dict[str, float]]] = {}
        self._readers: dict[str, Reader] = {}
        self._lock = threading.Lock()
        if registry is not None:
            registry.register(self)

    def add_reader(self, worker: str, read: Reader) -> None:
        """Read worker's health from read at every scrape (a worker in this process)."""
        with self._lock:
            self._readers[worker] = read

    def report(self, worker: str, values: Mapping[str, float]) -> bool:
        """Take a reported reading; False when it was refused (too many workers reporting)."""
        now = self.clock()
        known = set(attr.TRACKING_COUNTERS) | set(attr.TRACKING_GAUGES)
        kept = {k: float(v) for k, v in values.items() if k in known and math.isfinite(v) and 0 <= v <= _MAX_VALUE}
        with self._lock:
            self._expire(now)
            previous = self._reports.get(worker)
            if previous is None and len(self._reports) >= self.max_workers:
                return False
            merged = {**previous[1], **kept} if previous is not None else kept
            self._reports[worker] = (now, merged)
        return True

    def _expire(self, now: float) -> None:
        for worker in [w for w, (at, _) in self._reports.items() if now - at > self.expiry]:
            log.info("worker %s sent no tracking health for %.0fs; dropping its series", worker, self.expiry)
            del self._reports[worker]

    def readings(self) -> dict[str, dict[str, float]]:
        """The current reading of every worker, reported or read now."""
        with self._lock:
            self._expire(self.clock())
            out = {worker: dict(values) for worker, (_, values) in self._reports.items()}
            readers = list(self._readers.items())
        for worker, read in readers:
            out[worker] = {k: float(v) for k, v in read().items()}
        return out

    def describe(self) -> Iterator[Metric]:
        """Every family this collector serves, so the registry can refuse duplicate names."""
        yield from _new_families()

    def collect(self) -> Iterator[Metric]:
        """One family per tracker counter and gauge, a series per worker; every counter from 0."""
        readings = sorted(self.readings().items())
        names = (*attr.TRACKING_COUNTERS, *attr.TRACKING_GAUGES)
        for name, family in zip(names, _new_families(), strict=True):
            for worker, values in readings:
                family.add_metric([worker], values.get(name, 0.0))
            yield family


def _new_families() -> list[CounterMetricFamily | GaugeMetricFamily]:
    """Empty families of the tracker's counters, then its gauges."""
    families: list[CounterMetricFamily | GaugeMetricFamily] = []
    for name in attr.TRACKING_COUNTERS:
        help_text = m.WORKER_TRACKING_HELP[name]
        families.append(CounterMetricFamily(m.WORKER_TRACKING + name, help_text, labels=m.WORKER_TRACKING_LABELS))
    for name in attr.TRACKING_GAUGES:
        help_text = m.WORKER_TRACKING_HELP[name]
        families.append(GaugeMetricFamily(m.WORKER_TRACKING + name, help_text, labels=m.WORKER_TRACKING_LABELS))
    return families
