"""Span-to-metrics: finished `embedding.job` spans become histograms and counters.

One core (`SpanMetrics.record`) is fed two ways: `MetricsSpanProcessor` in process, and
the OTLP/HTTP receiver for a worker in another container. The tenant label is bounded by
a `TenantLimiter`; past its limit new tenants fold into `__other__`.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from exporter import metrics as m
from jobs import telemetry as attr

NANOS = 1e9


class TenantLimiter:
    """Admits the first `limit` tenants as label values; later ones fold into __other__."""

    def __init__(self, limit: int, registry: CollectorRegistry) -> None:
        self.limit = limit
        self._admitted: set[str] = set()
        self._folded: set[str] = set()
        self._lock = threading.Lock()
        self._folded_gauge = Gauge(
            m.TENANTS_FOLDED,
            'Distinct tenants folded into tenant="__other__" because the tenant label limit was reached.',
            registry=registry,
        )

    def label(self, tenant: str) -> str:
        """The label value for tenant: itself while there is room, else __other__."""
        with self._lock:
            if tenant in self._admitted:
                return tenant
            if len(self._admitted) < self.limit:
                self._admitted.add(tenant)
                return tenant
            if tenant not in self._folded:
                self._folded.add(tenant)
                self._folded_gauge.set(len(self._folded))
            return m.OTHER_TENANT


class SpanMetrics:
    """Event metrics derived from job spans, registered on one registry."""

    def __init__(self, registry: CollectorRegistry, *, tenant_limit: int = 500) -> None:
        self.registry = registry
        self.tenants = TenantLimiter(tenant_limit, registry)
        self.duration = Histogram(
            m.JOB_DURATION, m.JOB_DURATION_HELP, ["tenant", "outcome"], buckets=m.DURATION_BUCKETS, registry=registry
        )
        self.queue_wait = Histogram(
            m.QUEUE_WAIT, m.QUEUE_WAIT_HELP, ["tenant"], buckets=m.QUEUE_WAIT_BUCKETS, registry=registry
        )
        self.attempts = Counter(m.ATTEMPTS, m.ATTEMPTS_HELP, ["tenant", "outcome"], registry=registry)
        self.vectors = Counter(m.VECTORS, m.VECTORS_HELP, ["tenant"], registry=registry)
        self.received = Counter(
            m.SPANS_RECEIVED, "Job spans turned into metrics, by source.", ["source"], registry=registry
        )
        self.dropped = Counter(
            m.SPANS_DROPPED, "Spans that could not be turned into metrics, by reason.", ["reason"], registry=registry
        )
        self._seen: set[str] = set()

    def record(
        self,
        *,
        name: str,
        kind: SpanKind,
        start_ns: int,
        end_ns: int,
        attributes: Mapping[str, Any],
        trace_id: int,
        source: str,
    ) -> bool:
        """Fold one finished span into the metrics; True when it was a job span that counted."""
        if name != attr.JOB_SPAN or kind is not SpanKind.CONSUMER:
            return False
        outcome = attributes.get(attr.OUTCOME)
        if outcome not in m.ATTEMPT_OUTCOMES:
            # Duplicates ("skipped") and interrupted attempts ("abandoned") are not attempts.
            return False
        if end_ns < start_ns:
            self.dropped.labels("negative_duration").inc()
            return False
        raw_tenant = attributes.get(attr.TENANT)
        tenant = self.tenants.label(raw_tenant) if isinstance(raw_tenant, str) and raw_tenant else m.UNKNOWN_TENANT
        self._zero_init(tenant)
        exemplar = {"trace_id": format(trace_id, "032x")} if trace_id else None
        self.duration.labels(tenant, outcome).observe((end_ns - start_ns) / NANOS, exemplar)
        self.attempts.labels(tenant, outcome).inc(1, exemplar)
        wait = attributes.get(attr.QUEUE_WAIT)
        if isinstance(wait, int | float) and wait >= 0:
            self.queue_wait.labels(tenant).observe(float(wait), exemplar)
        vectors = attributes.get(attr.VECTOR_COUNT)
        if outcome == "completed" and isinstance(vectors, int) and vectors > 0:
            self.vectors.labels(tenant).inc(vectors)
        self.received.labels(source).inc()
        return True

    def _zero_init(self, tenant: str) -> None:
        # Zero series for every outcome let failure-ratio rules see 0 rather than nothing.
        if tenant in self._seen:
            return
        self._seen.add(tenant)
        for outcome in m.ATTEMPT_OUTCOMES:
            self.attempts.labels(tenant, outcome)
        self.vectors.labels(tenant)


class MetricsSpanProcessor(SpanProcessor):
    """Feeds spans finished in this process straight into SpanMetrics."""

    def __init__(self, metrics: SpanMetrics) -> None:
        self.metrics = metrics

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        """Nothing to do when a span starts."""

    def on_end(self, span: ReadableSpan) -> None:
        """Record a finished span."""
        if span.start_time is None or span.end_time is None or span.context is None:
            return
        self.metrics.record(
            name=span.name,
            kind=span.kind,
            start_ns=span.start_time,
            end_ns=span.end_time,
            attributes=span.attributes or {},
            trace_id=span.context.trace_id,
            source="in_process",
        )

    def shutdown(self) -> None:
        """Nothing to release."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Recording is synchronous: always flushed."""
        return True
