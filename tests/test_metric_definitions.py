"""Every metric the exporter serves is defined in exporter/metrics.py: name, help text and labels."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge
from pytest_aiohttp.plugin import AiohttpClient

from exporter import metrics as m
from exporter.app import create_app, create_otlp_app
from exporter.keys import REGISTRY, SPAN_METRICS, STATE, WORKER_HEALTH
from exporter.spanmetrics import SpanMetrics
from exporter.state import StateCollector
from exporter.tenants import TenantLimiter
from exporter.workerhealth import WorkerHealth
from jobs import telemetry as attr
from jobs.model import Job
from jobs.settings import Settings
from jobs.sqlite_store import SQLiteJobStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteJobStore]:
    store = await SQLiteJobStore.open(tmp_path / "jobs.db")
    await store.create(Job.new(job_id="j1", tenant_id="acme", shard_id="s1", shard_type_id="d"))
    yield store
    await store.close()


async def _queue_depth() -> dict[str, int]:
    return {"active": 1, "scheduled": 0, "dead_letter": 0}


def _defined_help() -> set[str]:
    texts = {value for name, value in vars(m).items() if name.endswith("_HELP") and isinstance(value, str)}
    return texts | set(m.WORKER_TRACKING_HELP.values())


def _defined_labels() -> set[tuple[str, ...]]:
    return {value for name, value in vars(m).items() if "_LABELS" in name and isinstance(value, tuple)}


@pytest.mark.parametrize("detail", m.DETAIL_LEVELS)
async def test_every_family_served_takes_its_help_and_labels_from_the_metrics_module(
    aiohttp_client: AiohttpClient, store: SQLiteJobStore, detail: str
) -> None:
    settings = Settings(metrics_cache_ttl=0, metrics_detail=detail, forward_otlp_endpoint="http://127.0.0.1:9")
    app = create_app(settings, store, depth_source=_queue_depth)
    create_otlp_app(settings, app[SPAN_METRICS], app[REGISTRY], app[WORKER_HEALTH])
    await aiohttp_client(app)
    await asyncio.wait_for(app[STATE].refreshed.wait(), 10)
    await asyncio.wait_for(app[STATE].depth_refreshed.wait(), 10)
    now = time.time_ns()
    for outcome in m.ATTEMPT_OUTCOMES:
        app[SPAN_METRICS].record_batch([("acme", outcome, now - 10**9, now, 0.5, 3, 1)], "in_process")
    app[WORKER_HEALTH].report("worker-1", dict.fromkeys(attr.TRACKING_COUNTERS + attr.TRACKING_GAUGES, 0.0))

    ours = [family for family in app[REGISTRY].collect() if family.name.startswith("embedding_")]
    defined_help, defined_labels = _defined_help(), _defined_labels()
    for family in ours:
        assert family.documentation in defined_help, family.name
        assert family.samples, f"{family.name} has no sample to show its labels"
        labels = tuple(name for name in family.samples[0].labels if name != "le")
        assert not labels or labels in defined_labels, (family.name, labels)
    names = {family.name for family in ours}
    assert {m.JOBS, m.QUEUE_MESSAGES, m.ATTEMPTS, m.JOB_DURATION, m.FORWARD_DROPPED, m.BUILD_INFO} <= names


async def test_state_collector_describes_its_families_so_a_duplicate_name_is_refused(store: SQLiteJobStore) -> None:
    with_depth = CollectorRegistry()
    StateCollector(store, with_depth, limiter=TenantLimiter(10), depth_source=_queue_depth, is_leader=lambda: False)
    # Described even while a follower, which serves none of them.
    for name in (m.JOBS, m.JOBS_STUCK, m.JOBS_STUCK_OLDEST, m.QUEUE_MESSAGES):
        with pytest.raises(ValueError, match="Duplicated timeseries"):
            Gauge(name, "a second family of the same name", registry=with_depth)
    without_depth = CollectorRegistry()
    StateCollector(store, without_depth, limiter=TenantLimiter(10))
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Gauge(m.JOBS, "a second family of the same name", registry=without_depth)
    # No queue to read: the depth gauge is neither served nor claimed.
    Gauge(m.QUEUE_MESSAGES, "free to use", registry=without_depth)


def test_span_metrics_and_worker_health_describe_their_families_so_a_duplicate_name_is_refused() -> None:
    registry = CollectorRegistry()
    SpanMetrics(registry)
    WorkerHealth(registry)
    taken = [m.ATTEMPTS, m.VECTORS, m.JOB_DURATION, m.QUEUE_WAIT, m.SPANS_RECEIVED, m.SPANS_DROPPED]
    taken += [m.TENANTS_FOLDED, m.TENANTS_EVICTED]
    taken += [m.WORKER_TRACKING + name for name in attr.TRACKING_COUNTERS + attr.TRACKING_GAUGES]
    for name in taken:
        with pytest.raises(ValueError, match="Duplicated timeseries"):
            Counter(name, "a second family of the same name", registry=registry)
