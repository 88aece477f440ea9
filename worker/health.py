"""The worker's tracking health as OTLP metrics, pushed to the exporter beside it.

The worker has no listener of its own; its sidecar's OTLP receiver already takes its spans, so
the tracker's counters (store failures, dropped, replayed and adopted writes) and its buffer size
go the same way, over OTLP/HTTP to /v1/metrics, where the exporter serves them as
embedding_worker_tracking_* series. Values are read from the tracker at each export, so they are
reported from the worker's first export on, zeros included.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from jobs import telemetry as attr
from worker.tracing import otlp_url
from worker.tracker import JobTracker

# Often enough for a ten-minute alert window to see a drop within one scrape or two; the standard
# OTEL_METRIC_EXPORT_INTERVAL (milliseconds) overrides it.
EXPORT_INTERVAL_MS = 10_000
# The last export runs at shutdown, inside the pod's grace period.
EXPORT_TIMEOUT_S = 5.0


def worker_id() -> str:
    """This worker process's name in the metrics: host (the pod) and pid, stable across container restarts."""
    return f"{socket.gethostname()}:{os.getpid()}"


def tracking_snapshot(tracker: JobTracker) -> dict[str, int]:
    """The tracker's health counters and buffer size, keyed as jobs/telemetry.py names them."""
    values = {name: int(getattr(tracker, name)) for name in attr.TRACKING_COUNTERS}
    values["buffered_writes"] = tracker.buffered
    return values


def create_meter_provider(
    tracker: JobTracker, service_name: str, otlp_endpoint: str = "", otlp_token: str = ""
) -> MeterProvider | None:
    """A provider that pushes the tracker's health over OTLP/HTTP, or None when no endpoint is set.

    Shut it down after the tracker stops: its last export carries the final counts.
    """
    url = otlp_url(otlp_endpoint, "metrics")
    if url is None:
        return None
    headers = {"Authorization": f"Bearer {otlp_token}"} if otlp_token else None
    interval = float(os.environ.get("OTEL_METRIC_EXPORT_INTERVAL", EXPORT_INTERVAL_MS))
    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=url, headers=headers, timeout=EXPORT_TIMEOUT_S), export_interval_millis=interval
    )
    resource = Resource.create({"service.name": service_name, attr.SERVICE_INSTANCE_ID: worker_id()})
    provider = MeterProvider(resource=resource, metric_readers=[reader])
    meter = provider.get_meter(attr.INSTRUMENTATION_NAME)

    def reading(name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(tracking_snapshot(tracker)[name])]

        return observe

    for name in attr.TRACKING_COUNTERS:
        meter.create_observable_counter(attr.TRACKING_METRIC_PREFIX + name, callbacks=[reading(name)])
    for name in attr.TRACKING_GAUGES:
        meter.create_observable_gauge(attr.TRACKING_METRIC_PREFIX + name, callbacks=[reading(name)])
    return provider
