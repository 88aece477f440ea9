"""The scrape path: series budget, fast rendering equal to the client library's, gzip, cache, off-loop renders."""

from __future__ import annotations

import asyncio
import gzip
import math
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.trace import SpanKind
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import parser as openmetrics_parser
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp.plugin import AiohttpClient

from exporter import exposition
from exporter import metrics as m
from exporter.app import create_app
from exporter.keys import REGISTRY, STATE
from exporter.spanmetrics import SpanMetrics
from exporter.state import StateCollector
from jobs import telemetry as attr
from jobs.model import Job, JobStatus
from jobs.settings import Settings
from jobs.sqlite_store import SQLiteJobStore
from jobs.version import package_version
from tests.components import require_binary, wait_until
from tests.helpers.metrics import job_span_request, receiver_of
from tests.prometheus_stack import INSTALL_HINT

Client = TestClient[web.Request, web.Application]
parse_openmetrics: Callable[[str], Iterable[Metric]] = openmetrics_parser.text_string_to_metric_families
OUTCOMES = ("completed", "failed", "dead_lettered")
PROTOBUF = {"Content-Type": "application/x-protobuf"}


async def seed(store: SQLiteJobStore, tenant: str) -> None:
    """One job of tenant in every status a job can rest in."""
    for n, status in enumerate(JobStatus):
        job = await store.create(Job.new(job_id=f"j{n}", tenant_id=tenant, shard_id=f"s{n}", shard_type_id="d"))
        path = {
            JobStatus.PENDING: [],
            JobStatus.PROCESSING: [JobStatus.PROCESSING],
            JobStatus.COMPLETED: [JobStatus.PROCESSING, JobStatus.COMPLETED],
            JobStatus.FAILED: [JobStatus.PROCESSING, JobStatus.FAILED],
            JobStatus.DEAD_LETTERED: [JobStatus.DEAD_LETTERED],
        }[status]
        current = job.status
        for step in path:
            await store.transition(tenant, job.id, current, step)
            current = step


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SQLiteJobStore]:
    store = await SQLiteJobStore.open(tmp_path / "jobs.db")
    yield store
    await store.close()


async def full_exposition(client: Client, receiver: Client, accept: str = "") -> str:
    for outcome in OUTCOMES:
        body = job_span_request("acme", outcome).SerializeToString()
        assert (await receiver.post("/v1/traces", data=body, headers=PROTOBUF)).status == 200
    response = await client.get("/metrics", headers={"Accept": accept} if accept else {})
    assert response.status == 200
    return await response.text()


def without_process(text: str) -> str:
    """text without the process collector's samples, which change from one render to the next (CPU, memory)."""
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith("process_"))


def samples_of(text: str, tenant: str) -> Counter[str]:
    """Samples per family that carry tenant=tenant."""
    counts: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("tenant") == tenant:
                counts[family.name] += 1
    return counts


@pytest.mark.parametrize(("detail", "budget"), [("compact", 40), ("full", 90)])
async def test_a_tenant_costs_at_most_its_budget_of_samples(
    aiohttp_client: AiohttpClient, sqlite_store: SQLiteJobStore, detail: str, budget: int
) -> None:
    await seed(sqlite_store, "acme")
    app = create_app(Settings(metrics_cache_ttl=0, metrics_detail=detail, stuck_after=3600), sqlite_store)
    client = await aiohttp_client(app)
    await asyncio.wait_for(app[STATE].refreshed.wait(), 10)
    text = await full_exposition(client, await receiver_of(aiohttp_client, app))
    per_family = samples_of(text, "acme")
    total = sum(per_family.values())
    # Every per-tenant family is there: the budget is not met by leaving some out.
    assert set(per_family) == {
        "embedding_jobs",
        "embedding_jobs_stuck",
        "embedding_jobs_stuck_oldest_age_seconds",
        "embedding_job_attempts",
        "embedding_vectors",
        "embedding_job_duration_seconds",
        "embedding_job_queue_wait_seconds",
    }
    assert total <= budget, per_family
    durations = [s for f in text_string_to_metric_families(text) for s in f.samples if s.name.endswith("_count")]
    split = any("outcome" in s.labels for s in durations if s.name == "embedding_job_duration_seconds_count")
    assert split is (detail == "full")
    if detail == "compact":
        assert total > 30  # the compact budget is spent, not undercounted
    assert "_created" not in text


async def test_gzip_is_used_when_accepted_and_is_the_same_exposition(
    aiohttp_client: AiohttpClient, sqlite_store: SQLiteJobStore
) -> None:
    app = create_app(Settings(metrics_cache_ttl=0), sqlite_store)
    client = await aiohttp_client(app)
    plain = await full_exposition(client, await receiver_of(aiohttp_client, app))
    response = await client.get("/metrics", headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
    assert response.headers["Content-Encoding"] == "gzip"
    assert "Accept-Encoding" in response.headers["Vary"]
    compressed = await response.read()
    assert without_process(gzip.decompress(compressed).decode()) == without_process(plain)
    assert len(compressed) * 3 < len(plain)  # tenfold and more at scale: bench/bench_scrape.py
    refused = await client.get("/metrics", headers={"Accept-Encoding": "gzip;q=0"}, auto_decompress=False)
    assert "Content-Encoding" not in refused.headers


async def test_openmetrics_is_valid_with_exemplars_and_one_eof(
    aiohttp_client: AiohttpClient, sqlite_store: SQLiteJobStore
) -> None:
    await seed(sqlite_store, "acme")
    app = create_app(Settings(metrics_cache_ttl=0), sqlite_store)
    client = await aiohttp_client(app)
    await asyncio.wait_for(app[STATE].refreshed.wait(), 10)
    receiver = await receiver_of(aiohttp_client, app)
    text = await full_exposition(client, receiver, "application/openmetrics-text; version=1.0.0")
    assert text.endswith("# EOF\n")
    assert text.count("# EOF") == 1
    families = {f.name: f for f in parse_openmetrics(text)}
    exemplars = [s.exemplar for s in families["embedding_job_duration_seconds"].samples if s.exemplar]
    assert exemplars
    assert all(len(e.labels["trace_id"]) == 32 for e in exemplars)
    assert families["embedding_job_attempts"].type == "counter"
    assert families["embedding_jobs"].type == "gauge"


async def test_a_cached_body_is_served_within_the_ttl_and_renewed_after(
    aiohttp_client: AiohttpClient, sqlite_store: SQLiteJobStore
) -> None:
    app = create_app(Settings(metrics_cache_ttl=0.5), sqlite_store)
    client, receiver = await aiohttp_client(app), await receiver_of(aiohttp_client, app)
    first = await full_exposition(client, receiver)
    body = job_span_request("acme", "completed").SerializeToString()
    assert (await receiver.post("/v1/traces", data=body, headers=PROTOBUF)).status == 200
    again = await (await client.get("/metrics")).text()
    assert again == first

    async def renewed() -> bool:
        text = await (await client.get("/metrics")).text()
        return 'embedding_job_attempts_total{tenant="acme",outcome="completed"} 2' in text

    await wait_until(renewed, "a fresh render after the cache ttl", within=5)


class _BlockedRender:
    """A collector whose render waits until released: a stand-in for a render that takes long."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def collect(self) -> list[object]:
        return []

    def render(self, out: list[str], openmetrics: bool) -> None:
        self.started.set()
        self.release.wait(10)


async def test_health_and_span_ingest_never_wait_on_a_render(
    aiohttp_client: AiohttpClient, sqlite_store: SQLiteJobStore
) -> None:
    app = create_app(Settings(metrics_cache_ttl=0), sqlite_store)
    blocked = _BlockedRender()
    app[REGISTRY].register(blocked)  # type: ignore[arg-type]
    client, receiver = await aiohttp_client(app), await receiver_of(aiohttp_client, app)
    scrapes = [asyncio.create_task(client.get("/metrics")) for _ in range(3)]
    try:
        await asyncio.wait_for(asyncio.to_thread(blocked.started.wait, 10), 10)
        health = await asyncio.wait_for(client.get("/healthz"), 2)
        assert health.status == 200
        body = job_span_request("acme", "completed").SerializeToString()
        ingest = await asyncio.wait_for(receiver.post("/v1/traces", data=body, headers=PROTOBUF), 2)
        assert ingest.status == 200
        assert not any(s.done() for s in scrapes)
    finally:
        blocked.release.set()
    responses = await asyncio.gather(*scrapes)
    assert {r.status for r in responses} == {200}
    # Concurrent scrapes share one render.
    texts = {await r.text() for r in responses}
    assert len(texts) == 1


async def test_store_tenants_take_label_places_from_names_seen_only_in_spans(
    aiohttp_client: AiohttpClient, sqlite_store: SQLiteJobStore
) -> None:
    app = create_app(Settings(metrics_cache_ttl=0, tenant_label_limit=3, refresh_interval=3600), sqlite_store)
    client, receiver = await aiohttp_client(app), await receiver_of(aiohttp_client, app)
    await asyncio.wait_for(app[STATE].refreshed.wait(), 10)
    for junk in ("junk-a", "junk-b", "junk-c", "junk-d"):
        body = job_span_request(junk, "completed").SerializeToString()
        assert (await receiver.post("/v1/traces", data=body, headers=PROTOBUF)).status == 200
    for tenant in ("acme", "globex"):
        await seed(sqlite_store, tenant)
    assert await app[STATE].refresh()
    text = await (await client.get("/metrics")).text()
    labelled = {
        s.labels["tenant"] for f in text_string_to_metric_families(text) for s in f.samples if "tenant" in s.labels
    }
    assert {"acme", "globex"} <= labelled
    assert len(labelled - {"__other__"}) == 3
    assert "embedding_exporter_tenants_evicted_total 2" in text
    # A real tenant's later spans carry its own label.
    body = job_span_request("globex", "failed").SerializeToString()
    await receiver.post("/v1/traces", data=body, headers=PROTOBUF)
    text = await (await client.get("/metrics")).text()
    assert 'embedding_job_attempts_total{tenant="globex",outcome="failed"} 1' in text


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({attr.QUEUE_WAIT: math.inf}, "invalid_value"),
        ({attr.QUEUE_WAIT: math.nan}, "invalid_value"),
        ({attr.QUEUE_WAIT: -1.0}, "invalid_value"),
        ({attr.QUEUE_WAIT: 1e12}, "invalid_value"),
        ({attr.QUEUE_WAIT: "soon"}, "invalid_value"),
        ({attr.VECTOR_COUNT: 10**15}, "invalid_value"),
        ({attr.VECTOR_COUNT: True}, "invalid_value"),
        ({"end_ns": 10**9 * 86400 * 30}, "invalid_value"),
        ({"end_ns": -1}, "negative_duration"),
    ],
)
def test_absurd_values_are_dropped_by_reason_and_leave_sums_alone(changes: dict[str, object], reason: str) -> None:
    metrics = SpanMetrics(None)
    attributes: dict[str, object] = {attr.TENANT: "acme", attr.OUTCOME: "completed", attr.QUEUE_WAIT: 0.5}
    attributes[attr.VECTOR_COUNT] = 3
    end_ns = int(changes.pop("end_ns", 2 * 10**9))  # type: ignore[call-overload]
    attributes.update(changes)
    counted = metrics.record(
        name=attr.JOB_SPAN,
        kind=SpanKind.CONSUMER,
        start_ns=0,
        end_ns=end_ns,
        attributes=attributes,
        trace_id=1,
        source="otlp",
    )
    assert not counted
    text = generate_latest(metrics).decode()
    assert f'embedding_exporter_spans_dropped_total{{reason="{reason}"}} 1.0' in text
    assert "acme" not in text


_tenants = st.sampled_from(["acme", "globex", 'we"ird\\name\n', "t-" + "x" * 60])
_spans = st.lists(
    st.tuples(
        _tenants,
        st.sampled_from([*OUTCOMES, "skipped"]),
        st.integers(0, 400 * 10**9),
        st.one_of(st.none(), st.floats(0, 4000)),
        st.one_of(st.none(), st.integers(0, 50)),
        st.integers(0, 2**128 - 1),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(spans=_spans, detail=st.sampled_from(["compact", "full"]), openmetrics=st.booleans())
def test_fast_render_equals_the_client_librarys_rendering(
    spans: list[tuple[str, str, int, float | None, int | None, int]], detail: str, openmetrics: bool
) -> None:
    registry = exposition.ExporterRegistry()
    metrics = SpanMetrics(registry, tenant_limit=3, detail=detail)
    metrics.record_batch([(t, o, 0, d, w, v, trace) for t, o, d, w, v, trace in spans], "otlp")
    fast = exposition.render(registry, openmetrics).decode()
    slow_registry = exposition.Families([metrics])
    if openmetrics:
        slow = exposition.generate_openmetrics(slow_registry).decode()
        parse = parse_openmetrics
    else:
        slow = generate_latest(slow_registry).decode()
        parse = text_string_to_metric_families

    def facts(text: str) -> set[tuple[object, ...]]:
        out: set[tuple[object, ...]] = set()
        for family in parse(text):
            for s in family.samples:
                exemplar = (s.exemplar.labels["trace_id"], round(s.exemplar.value, 9)) if s.exemplar else None
                labels = tuple(sorted(s.labels.items()))
                out.add((family.name, family.type, family.unit, s.name, labels, s.value, exemplar))
        return out

    assert facts(fast) == facts(slow)


def test_state_gauges_render_the_same_fast_and_slow() -> None:
    from typing import cast

    from exporter.state import Snapshot
    from exporter.tenants import TenantLimiter
    from jobs.store import JobStore

    registry = exposition.ExporterRegistry()
    state = StateCollector(cast(JobStore, object()), registry, limiter=TenantLimiter(2))
    state.snapshot = Snapshot(
        jobs={t: dict.fromkeys(JobStatus, 2) for t in ("a", "b", "c")},
        stuck={("c", "pending"): (4, 99.5)},
    )
    state.depth = {"active": 3, "scheduled": 1}
    fast: list[str] = []
    state.render(fast, False)
    slow = generate_latest(exposition.Families([state])).decode()

    def facts(text: str) -> set[tuple[object, ...]]:
        return {
            (s.name, tuple(sorted(s.labels.items())), s.value)
            for f in text_string_to_metric_families(text)
            for s in f.samples
        }

    assert facts("".join(fast)) == facts(slow)
    assert ("embedding_jobs_stuck", (("status", "pending"), ("tenant", "__other__")), 4.0) in facts(slow)


# Families served per tenant or per worker: their series start with the tenant or the worker, not before.
PER_SUBJECT_COUNTERS = {
    "embedding_job_attempts",
    "embedding_vectors",
    "embedding_worker_tracking_store_failures",
    "embedding_worker_tracking_dropped_writes",
    "embedding_worker_tracking_replayed_writes",
    "embedding_worker_tracking_adopted_writes",
}


async def test_a_fresh_exporter_serves_every_counter_from_zero_and_its_process_and_build(
    aiohttp_client: AiohttpClient, sqlite_store: SQLiteJobStore
) -> None:
    settings = Settings(metrics_cache_ttl=0, forward_otlp_endpoint="http://127.0.0.1:9")
    app = create_app(settings, sqlite_store)
    client = await aiohttp_client(app)
    await receiver_of(aiohttp_client, app)
    await asyncio.wait_for(app[STATE].refreshed.wait(), 10)
    text = await (await client.get("/metrics")).text()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    counters = {name for name, family in families.items() if family.type == "counter"}
    assert counters >= PER_SUBJECT_COUNTERS
    for name in counters - PER_SUBJECT_COUNTERS:
        assert families[name].samples, f"{name} has no series before its first event"
        if name.startswith("embedding_"):
            assert all(s.value == 0 for s in families[name].samples), name
    dropped = {s.labels["reason"] for s in families["embedding_exporter_spans_dropped"].samples}
    assert dropped == set(m.DROP_REASONS)
    forward = {s.labels["reason"] for s in families["embedding_exporter_forward_dropped"].samples}
    assert forward == set(m.FORWARD_DROP_REASONS)
    [build] = families["embedding_jobs_build_info"].samples
    assert (build.labels, build.value) == ({"version": package_version()}, 1)
    assert package_version() == "0.1.0"
    [python] = families["python_info"].samples
    assert python.labels["implementation"] == "CPython"
    [resident] = families["process_resident_memory_bytes"].samples
    assert resident.value > 1_000_000
    assert families["process_cpu_seconds"].samples[0].value > 0
    promtool = await asyncio.create_subprocess_exec(
        require_binary("promtool", INSTALL_HINT),
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    lint, _ = await asyncio.wait_for(promtool.communicate(text.encode()), 30)
    assert promtool.returncode == 0, lint.decode()


async def test_openmetrics_declares_seconds_on_every_family_measured_in_seconds(
    aiohttp_client: AiohttpClient, sqlite_store: SQLiteJobStore
) -> None:
    app = create_app(Settings(metrics_cache_ttl=0), sqlite_store, depth_source=_empty_queue)
    client = await aiohttp_client(app)
    await asyncio.wait_for(app[STATE].depth_refreshed.wait(), 10)
    text = await full_exposition(client, await receiver_of(aiohttp_client, app), "application/openmetrics-text")
    ours = {f.name: f.unit for f in parse_openmetrics(text) if f.name.startswith("embedding_")}
    in_seconds = {name for name in ours if name.endswith("_seconds")}
    assert in_seconds == {
        m.JOB_DURATION,
        m.QUEUE_WAIT,
        m.JOBS_STUCK_OLDEST,
        m.REFRESH_DURATION,
        m.REFRESH_LAST_SUCCESS,
        m.QUEUE_DEPTH_DURATION,
        m.QUEUE_DEPTH_LAST_SUCCESS,
    }
    assert {name: ours[name] for name in in_seconds} == dict.fromkeys(in_seconds, "seconds")
    assert {name: unit for name, unit in ours.items() if name not in in_seconds and unit} == {}


async def _empty_queue() -> dict[str, int]:
    return {"active": 0, "scheduled": 0, "dead_letter": 0}
