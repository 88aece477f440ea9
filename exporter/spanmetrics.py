"""Span-to-metrics: finished `embedding.job` spans become histograms and counters.

One core (`SpanMetrics`) is fed two ways: `MetricsSpanProcessor` in process, and the OTLP/HTTP
receiver for a worker in another container, a batch at a time. The hot path is plain Python
arithmetic on per-tenant arrays under one lock: no label lookups, no exemplar validation, no
per-span counter calls. A scrape renders the arrays straight to text (exporter/exposition.py);
`collect()` yields the same values as standard metric families for registry readers.
"""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar

from exporter import exposition as ex
from exporter import metrics as m
from exporter.tenants import TenantLimiter
from jobs import telemetry as attr

NANOS = 1e9
# No single attempt or queue wait takes a week, nor makes ten million vectors: such values come
# from a broken clock or a forged span, and would corrupt a tenant's sums for good.
MAX_SECONDS = 7 * 24 * 3600.0
MAX_VECTORS = 10_000_000
OUTCOME_INDEX: Mapping[object, int] = {outcome: i for i, outcome in enumerate(m.ATTEMPT_OUTCOMES)}
_COMPLETED = OUTCOME_INDEX["completed"]
_NEGATIVE, _INVALID = (m.DROP_REASONS.index(r) for r in ("negative_duration", "invalid_value"))
# A job span as the receivers hand it over: tenant, outcome, start and end (ns since the epoch),
# queue wait (s) and vector count (None when absent), trace id (0 when absent).
JobSpan = tuple[object, object, int, int, object, object, int]
# An exemplar: trace id, observed value, unix time.
_Exemplar = tuple[int, float, float]


class _Histogram:
    """Per-bucket (not cumulative) counts, +Inf last; the sum; the last exemplar per bucket."""

    __slots__ = ("counts", "exemplars", "total")

    def __init__(self, size: int) -> None:
        self.counts = [0] * size
        self.total = 0.0
        self.exemplars: list[_Exemplar | None] = [None] * size


class _Tenant:
    """Everything one tenant label value accumulates."""

    __slots__ = ("attempt_exemplars", "attempts", "durations", "vectors", "wait")

    def __init__(self, duration_histograms: int, duration_size: int, wait_size: int) -> None:
        self.attempts = [0] * len(m.ATTEMPT_OUTCOMES)
        self.attempt_exemplars: list[_Exemplar | None] = [None] * len(m.ATTEMPT_OUTCOMES)
        self.vectors = 0
        self.durations = [_Histogram(duration_size) for _ in range(duration_histograms)]
        self.wait = _Histogram(wait_size)


def _number(value: object) -> float | None:
    """value as a float if it is a finite number in [0, MAX_SECONDS], else None (bools are not numbers)."""
    if type(value) is float or type(value) is int:
        number = float(value)
        if 0.0 <= number <= MAX_SECONDS:  # also false for NaN
            return number
    return None


class SpanMetrics(Collector):
    """Event metrics derived from job spans: attempts, vectors, durations and queue waits per tenant."""

    def __init__(
        self,
        registry: CollectorRegistry | None,
        *,
        tenant_limit: int = 1000,
        detail: str = "compact",
        tenants: TenantLimiter | None = None,
    ) -> None:
        if detail not in m.DETAIL_LEVELS:
            raise ValueError(f"detail must be one of {', '.join(m.DETAIL_LEVELS)}; got {detail!r}")
        self.tenants = tenants or TenantLimiter(tenant_limit)
        self.tenants.on_evict(self._evict)
        self.tenants.on_admit_known(self._zero_initialise)
        self.by_outcome = detail == "full"
        self.duration_buckets = m.DURATION_BUCKETS_FULL if self.by_outcome else m.DURATION_BUCKETS
        self.wait_buckets = m.QUEUE_WAIT_BUCKETS_FULL if self.by_outcome else m.QUEUE_WAIT_BUCKETS
        self._shape = (len(m.ATTEMPT_OUTCOMES) if self.by_outcome else 1, len(self.duration_buckets) + 1)
        self._series: dict[str, _Tenant] = {}
        self._received = [0] * len(m.SPAN_SOURCES)
        self._dropped = [0] * len(m.DROP_REASONS)
        self._lock = threading.Lock()
        if registry is not None:
            registry.register(self)

    # -- recording ------------------------------------------------------------------

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
        get = attributes.get
        span = (get(attr.TENANT), get(attr.OUTCOME), start_ns, end_ns, get(attr.QUEUE_WAIT), get(attr.VECTOR_COUNT))
        return self.record_batch([(*span, trace_id)], source) == 1

    def record_batch(self, spans: Iterable[JobSpan], source: str) -> int:
        """Fold job spans (already filtered by name and kind) into the metrics; how many counted."""
        source_index = m.SPAN_SOURCES.index(source)
        label = self.tenants.label
        series = self._series
        dropped = self._dropped
        duration_buckets, wait_buckets = self.duration_buckets, self.wait_buckets
        by_outcome = self.by_outcome
        now = time.time()
        counted = 0
        with self._lock:
            for tenant, outcome, start_ns, end_ns, wait, vectors, trace_id in spans:
                index = OUTCOME_INDEX.get(outcome)
                if index is None:
                    continue  # duplicates ("skipped") and interrupted attempts are not attempts
                if end_ns < start_ns:
                    dropped[_NEGATIVE] += 1
                    continue
                duration = (end_ns - start_ns) / NANOS
                waited = None if wait is None else _number(wait)
                if duration > MAX_SECONDS or (wait is not None and waited is None):
                    dropped[_INVALID] += 1
                    continue
                if vectors is not None and (type(vectors) is not int or not 0 <= vectors <= MAX_VECTORS):
                    dropped[_INVALID] += 1
                    continue
                name = label(tenant) if type(tenant) is str and tenant else m.UNKNOWN_TENANT
                data = series.get(name)
                if data is None:
                    data = series[name] = _Tenant(*self._shape, len(wait_buckets) + 1)
                exemplar = (trace_id, duration, now) if trace_id else None
                data.attempts[index] += 1
                if exemplar is not None:
                    data.attempt_exemplars[index] = exemplar
                histogram = data.durations[index if by_outcome else 0]
                bucket = bisect_left(duration_buckets, duration)
                histogram.counts[bucket] += 1
                histogram.total += duration
                if exemplar is not None:
                    histogram.exemplars[bucket] = exemplar
                if waited is not None:
                    bucket = bisect_left(wait_buckets, waited)
                    data.wait.counts[bucket] += 1
                    data.wait.total += waited
                    if trace_id:
                        data.wait.exemplars[bucket] = (trace_id, waited, now)
                if vectors and index == _COMPLETED:
                    data.vectors += vectors
                counted += 1
            self._received[source_index] += counted
        return counted

    def _zero_initialise(self, tenants: list[str]) -> None:
        # Counters a tenant has before its first span: an alert then sees 0 -> 1 on its first
        # dead-letter. Only tenants the store knows, within the label limit, and only the counters
        # (4 samples; histograms appear with the first span), so the series budget holds. Followers
        # never read the store: the rules count a series' appearance for them.
        with self._lock:
            for name in tenants:
                if name not in self._series:
                    self._series[name] = _Tenant(*self._shape, len(self.wait_buckets) + 1)

    def _evict(self, tenant: str) -> None:
        with self._lock:
            self._series.pop(tenant, None)

    # -- exposition -----------------------------------------------------------------

    def _snapshot(self) -> list[tuple[str, _Tenant]]:
        with self._lock:
            return sorted(self._series.items())

    def render(self, out: list[str], openmetrics: bool) -> None:
        """Append this collector's families to out in the text or OpenMetrics format."""
        tenants = self._snapshot()
        fragments = [(ex.label_pairs(tenant=name), data) for name, data in ex.paced(tenants)]
        outcome_labels = [ex.label_pairs(outcome=o) for o in m.ATTEMPT_OUTCOMES]

        ex.header(out, m.ATTEMPTS, m.ATTEMPTS_HELP, "counter", openmetrics)
        name = m.ATTEMPTS + "_total"
        for fragment, data in ex.paced(fragments):
            for i, outcome in enumerate(outcome_labels):
                ex.sample(out, name, f"{fragment},{outcome}", data.attempts[i], data.attempt_exemplars[i], openmetrics)
        ex.header(out, m.VECTORS, m.VECTORS_HELP, "counter", openmetrics)
        name = m.VECTORS + "_total"
        for fragment, data in ex.paced(fragments):
            out.append(f"{name}{{{fragment}}} {data.vectors}\n")

        ex.header(out, m.JOB_DURATION, m.JOB_DURATION_HELP, "histogram", openmetrics, m.SECONDS)
        les = ex.bucket_bounds(self.duration_buckets)
        for fragment, data in ex.paced(fragments):
            if self.by_outcome:
                for i, outcome in enumerate(outcome_labels):
                    histogram = data.durations[i]
                    if any(histogram.counts):
                        ex.histogram(out, m.JOB_DURATION, f"{fragment},{outcome}", les, histogram, openmetrics)
            elif any(data.durations[0].counts):  # empty only for a zero-initialised tenant: no buckets yet
                ex.histogram(out, m.JOB_DURATION, fragment, les, data.durations[0], openmetrics)
        ex.header(out, m.QUEUE_WAIT, m.QUEUE_WAIT_HELP, "histogram", openmetrics, m.SECONDS)
        les = ex.bucket_bounds(self.wait_buckets)
        for fragment, data in ex.paced(fragments):
            if any(data.wait.counts):
                ex.histogram(out, m.QUEUE_WAIT, fragment, les, data.wait, openmetrics)

        ex.header(out, m.SPANS_RECEIVED, m.SPANS_RECEIVED_HELP, "counter", openmetrics)
        for source, count in zip(m.SPAN_SOURCES, self._received, strict=True):
            out.append(f'{m.SPANS_RECEIVED}_total{{source="{source}"}} {count}\n')
        ex.header(out, m.SPANS_DROPPED, m.SPANS_DROPPED_HELP, "counter", openmetrics)
        for reason, count in zip(m.DROP_REASONS, self._dropped, strict=True):
            out.append(f'{m.SPANS_DROPPED}_total{{reason="{reason}"}} {count}\n')
        ex.header(out, m.TENANTS_FOLDED, m.TENANTS_FOLDED_HELP, "gauge", openmetrics)
        out.append(f"{m.TENANTS_FOLDED} {self.tenants.folded}\n")
        ex.header(out, m.TENANTS_EVICTED, m.TENANTS_EVICTED_HELP, "counter", openmetrics)
        out.append(f"{m.TENANTS_EVICTED}_total {self.tenants.evicted}\n")

    def _new_families(self) -> _Families:
        duration_labels = m.JOB_DURATION_LABELS_FULL if self.by_outcome else m.JOB_DURATION_LABELS
        return _Families(
            attempts=CounterMetricFamily(m.ATTEMPTS, m.ATTEMPTS_HELP, labels=m.ATTEMPTS_LABELS),
            vectors=CounterMetricFamily(m.VECTORS, m.VECTORS_HELP, labels=m.VECTORS_LABELS),
            duration=HistogramMetricFamily(m.JOB_DURATION, m.JOB_DURATION_HELP, labels=duration_labels, unit=m.SECONDS),
            wait=HistogramMetricFamily(m.QUEUE_WAIT, m.QUEUE_WAIT_HELP, labels=m.QUEUE_WAIT_LABELS, unit=m.SECONDS),
            received=CounterMetricFamily(m.SPANS_RECEIVED, m.SPANS_RECEIVED_HELP, labels=m.SPANS_RECEIVED_LABELS),
            dropped=CounterMetricFamily(m.SPANS_DROPPED, m.SPANS_DROPPED_HELP, labels=m.SPANS_DROPPED_LABELS),
            folded=GaugeMetricFamily(m.TENANTS_FOLDED, m.TENANTS_FOLDED_HELP),
            evicted=CounterMetricFamily(m.TENANTS_EVICTED, m.TENANTS_EVICTED_HELP),
        )

    def describe(self) -> Iterator[Metric]:
        """Every family this collector serves, so the registry can refuse duplicate names."""
        yield from self._new_families()

    def collect(self) -> Iterator[Metric]:
        """The same values as standard metric families (for registry readers; slower than render)."""
        tenants = self._snapshot()
        families = self._new_families()
        attempts, vectors, duration, wait = families.attempts, families.vectors, families.duration, families.wait
        for tenant, data in tenants:
            for i, outcome in enumerate(m.ATTEMPT_OUTCOMES):
                attempts.add_metric([tenant, outcome], data.attempts[i], exemplar=_exemplar(data.attempt_exemplars[i]))
            vectors.add_metric([tenant], data.vectors)
            if self.by_outcome:
                for i, outcome in enumerate(m.ATTEMPT_OUTCOMES):
                    if any(data.durations[i].counts):
                        _add_histogram(duration, [tenant, outcome], self.duration_buckets, data.durations[i])
            elif any(data.durations[0].counts):
                _add_histogram(duration, [tenant], self.duration_buckets, data.durations[0])
            if any(data.wait.counts):
                _add_histogram(wait, [tenant], self.wait_buckets, data.wait)
        for source, count in zip(m.SPAN_SOURCES, self._received, strict=True):
            families.received.add_metric([source], count)
        for reason, count in zip(m.DROP_REASONS, self._dropped, strict=True):
            families.dropped.add_metric([reason], count)
        families.folded.add_metric([], self.tenants.folded)
        families.evicted.add_metric([], self.tenants.evicted)
        yield from families


class _Families(NamedTuple):
    """This collector's families, in exposition order."""

    attempts: CounterMetricFamily
    vectors: CounterMetricFamily
    duration: HistogramMetricFamily
    wait: HistogramMetricFamily
    received: CounterMetricFamily
    dropped: CounterMetricFamily
    folded: GaugeMetricFamily
    evicted: CounterMetricFamily


def _exemplar(value: _Exemplar | None) -> Exemplar | None:
    if value is None:
        return None
    trace_id, observed, at = value
    return Exemplar({"trace_id": format(trace_id, "032x")}, observed, at)


def _add_histogram(
    family: HistogramMetricFamily, labels: list[str], bounds: tuple[float, ...], histogram: _Histogram
) -> None:
    cumulative = 0
    buckets: list[Any] = []
    for bound, count, exemplar in zip((*bounds, math.inf), histogram.counts, histogram.exemplars, strict=True):
        cumulative += count
        le = "+Inf" if bound == math.inf else ex.float_text(bound)
        buckets.append((le, cumulative, _exemplar(exemplar)) if exemplar else (le, cumulative))
    family.add_metric(labels, buckets, histogram.total)


class MetricsSpanProcessor(SpanProcessor):
    """Feeds spans finished in this process straight into SpanMetrics."""

    def __init__(self, metrics: SpanMetrics) -> None:
        self.metrics = metrics

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        """Nothing to do when a span starts."""

    def on_end(self, span: ReadableSpan) -> None:
        """Record a finished job span; other spans cost one comparison."""
        if span.name != attr.JOB_SPAN or span.kind is not SpanKind.CONSUMER:
            return
        start, end, context = span.start_time, span.end_time, span.context
        if start is None or end is None or context is None:
            return
        get = (span.attributes or {}).get
        job = (get(attr.TENANT), get(attr.OUTCOME), start, end, get(attr.QUEUE_WAIT), get(attr.VECTOR_COUNT))
        self.metrics.record_batch([(*job, context.trace_id)], "in_process")

    def shutdown(self) -> None:
        """Nothing to release."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Recording is synchronous: always flushed."""
        return True
