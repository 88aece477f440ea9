"""In-process cost of one job span through MetricsSpanProcessor.on_end, against bare client calls.

Subject: real ReadableSpan objects (built once, as the worker writes them: 1k tenants, every
outcome) handed to `MetricsSpanProcessor(SpanMetrics(registry, tenant_limit=1000)).on_end`.
Baseline: the same observations made directly on pre-resolved prometheus_client children
(duration and queue-wait observe, attempts and, for completed attempts, vectors inc), with no
attribute reading, tenant limiting, label lookup or exemplars. Run: python -m bench spans
"""

from __future__ import annotations

import time
from collections.abc import Callable

from opentelemetry.sdk.trace import ReadableSpan
from prometheus_client import CollectorRegistry, Counter, Histogram

from bench.exporter_rig import OUTCOMES, job_spans
from bench.harness import Figure, interleaved, ratios, report
from exporter import metrics as m
from exporter.spanmetrics import MetricsSpanProcessor, SpanMetrics
from jobs import telemetry as attr

TENANTS = 1000
SPANS = 3 * TENANTS * 10
ROUNDS = 7
TARGET_SECONDS = 10e-6

Observation = tuple[Histogram, float, Histogram, float, Counter, Counter | None, int]


def bare_observations(spans: list[ReadableSpan]) -> list[Observation]:
    """Per span: the children it touches, resolved up front, and the values it records."""
    registry = CollectorRegistry()
    duration = Histogram("d_seconds", "d", ["tenant", "outcome"], buckets=m.DURATION_BUCKETS, registry=registry)
    wait = Histogram("w_seconds", "w", ["tenant"], buckets=m.QUEUE_WAIT_BUCKETS, registry=registry)
    attempts = Counter("a", "a", ["tenant", "outcome"], registry=registry)
    vectors = Counter("v", "v", ["tenant"], registry=registry)
    out: list[Observation] = []
    for span in spans:
        a = span.attributes or {}
        tenant, outcome = str(a[attr.TENANT]), str(a[attr.OUTCOME])
        if outcome not in OUTCOMES or span.start_time is None or span.end_time is None:
            raise ValueError(f"not a finished job span: {span.name}")
        completed = outcome == "completed"
        out.append(
            (
                duration.labels(tenant, outcome),
                (span.end_time - span.start_time) / 1e9,
                wait.labels(tenant),
                _number(a[attr.QUEUE_WAIT]),
                attempts.labels(tenant, outcome),
                vectors.labels(tenant) if completed else None,
                int(_number(a[attr.VECTOR_COUNT])) if completed else 0,
            )
        )
    return out


def _number(value: object) -> float:
    if not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def per_span(run: Callable[[], None]) -> Callable[[], float]:
    """A subject: seconds per span for one pass over every span."""

    def subject() -> float:
        started = time.perf_counter()
        run()
        return (time.perf_counter() - started) / SPANS

    return subject


def main() -> None:
    """Print microseconds per span through on_end, as a ratio to the bare client calls."""
    spans = job_spans(SPANS, TENANTS)
    processor = MetricsSpanProcessor(SpanMetrics(CollectorRegistry(), tenant_limit=TENANTS))
    observations = bare_observations(spans)

    def through_processor() -> None:
        for span in spans:
            processor.on_end(span)

    def bare() -> None:
        for duration, seconds, wait, waited, attempts, vectors, count in observations:
            duration.observe(seconds)
            wait.observe(waited)
            attempts.inc()
            if vectors is not None:
                vectors.inc(count)

    # One pass each first, so every label child exists before timing, as in a running exporter.
    through_processor()
    bare()
    subject, baseline = interleaved(ROUNDS, per_span(through_processor), per_span(bare))
    figure, ratio = Figure.of(subject), ratios(subject, baseline)
    report(
        "job span through MetricsSpanProcessor.on_end",
        f"{figure.show('us', 1e6)} per span, {ratio.show('x')} bare client calls "
        f"({Figure.of(baseline).show('us', 1e6)})",
        f"<= {TARGET_SECONDS * 1e6:.0f} us per span",
        figure.median <= TARGET_SECONDS,
    )


if __name__ == "__main__":
    main()
