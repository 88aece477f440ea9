"""Cost of turning one job span into metrics, as a ratio to bare prometheus-client calls.

Baseline: the same histogram observations and counter increments made directly, without
the span attribute handling, tenant limiting and exemplars. Run: python -m bench.bench_metrics
"""

from __future__ import annotations

import time
from collections.abc import Callable

from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

from exporter import metrics as m
from exporter.spanmetrics import SpanMetrics
from jobs import telemetry as attr

N = 50_000
TENANTS = [f"tenant-{i}" for i in range(50)]


def best_of(fn: Callable[[], None], repeats: int = 5) -> float:
    """The fastest of several runs, in seconds: the least disturbed by a noisy machine."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def _ignore(_: object) -> None:
    return None


def main() -> None:
    """Print per-span cost of the span-metrics core and of a scrape, as ratios to baselines."""
    registry = CollectorRegistry()
    core = SpanMetrics(registry, tenant_limit=40)
    base_registry = CollectorRegistry()
    duration = Histogram("d_seconds", "d", ["tenant", "outcome"], buckets=m.DURATION_BUCKETS, registry=base_registry)
    wait = Histogram("w_seconds", "w", ["tenant"], buckets=m.QUEUE_WAIT_BUCKETS, registry=base_registry)
    attempts = Counter("a", "a", ["tenant", "outcome"], registry=base_registry)
    vectors = Counter("v", "v", ["tenant"], registry=base_registry)

    def spans() -> None:
        for i in range(N):
            tenant = TENANTS[i % len(TENANTS)]
            core.record(
                name=attr.JOB_SPAN,
                kind=SpanKind.CONSUMER,
                start_ns=0,
                end_ns=1_500_000_000,
                attributes={attr.TENANT: tenant, attr.OUTCOME: "completed", attr.VECTOR_COUNT: 4, attr.QUEUE_WAIT: 0.2},
                trace_id=i + 1,
                source="bench",
            )

    def baseline() -> None:
        for i in range(N):
            tenant = TENANTS[i % len(TENANTS)]
            duration.labels(tenant, "completed").observe(1.5)
            attempts.labels(tenant, "completed").inc()
            wait.labels(tenant).observe(0.2)
            vectors.labels(tenant).inc(4)

    core_time = best_of(spans)
    base_time = best_of(baseline)
    print(f"span -> metrics: {core_time / N * 1e6:.2f} us/span, {core_time / base_time:.2f}x bare client calls")
    scrape = best_of(lambda: _ignore(generate_latest(registry)), repeats=20)
    base_scrape = best_of(lambda: _ignore(generate_latest(base_registry)), repeats=20)
    print(f"scrape: {scrape * 1e3:.2f} ms, {scrape / base_scrape:.2f}x the same series without the exporter")


if __name__ == "__main__":
    main()
