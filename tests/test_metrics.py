"""/metrics: state gauges equal the store, event metrics equal what was processed, exactly."""

from __future__ import annotations

import asyncio
import gzip
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client import CollectorRegistry
from pytest_aiohttp.plugin import AiohttpClient, AiohttpServer

from exporter.app import create_app
from exporter.keys import STATE
from exporter.spanmetrics import MetricsSpanProcessor, SpanMetrics
from jobs import telemetry as attr
from jobs.model import Job, JobStatus, utcnow
from jobs.settings import Settings
from jobs.sqlite_store import SQLiteJobStore
from tests.components import require_binary
from tests.helpers.metrics import job_span_request, receiver_of, sample
from tests.pipeline import pipeline

S = JobStatus
Client = TestClient[web.Request, web.Application]
TEXT = "Vectors for everyone.\n\nA second paragraph so there is more than one chunk sometimes."


@pytest.fixture
async def seeded_store(tmp_path: Path) -> AsyncIterator[SQLiteJobStore]:
    store = await SQLiteJobStore.open(tmp_path / "jobs.db")
    old = utcnow() - timedelta(hours=3)
    for n in range(6):
        await store.create(Job.new(job_id=f"a{n}", tenant_id="acme", shard_id=f"s{n}", shard_type_id="d"))
    for n in range(4):
        await store.transition("acme", f"a{n}", S.PENDING, S.PROCESSING)
    for n in range(3):
        await store.transition("acme", f"a{n}", S.PROCESSING, S.COMPLETED)
    await store.create(
        Job.new(job_id="g1", tenant_id="globex", shard_id="s", shard_type_id="d").with_changes(
            created_at=old, updated_at=old
        )
    )
    yield store
    await store.close()


async def scrape(client: Client, accept: str = "") -> str:
    response = await client.get("/metrics", headers={"Accept": accept} if accept else {})
    assert response.status == 200
    return await response.text()


async def test_state_gauges_equal_the_store_counters(
    aiohttp_client: AiohttpClient, seeded_store: SQLiteJobStore
) -> None:
    app = create_app(Settings(metrics_cache_ttl=0, stuck_after=3600), seeded_store)
    client = await aiohttp_client(app)
    await asyncio.wait_for(app[STATE].refreshed.wait(), 10)
    text = await scrape(client)
    expected = {
        ("acme", "pending"): 2,
        ("acme", "processing"): 1,
        ("acme", "completed"): 3,
        ("acme", "failed"): 0,
        ("acme", "dead_lettered"): 0,
        ("globex", "pending"): 1,
    }
    for (tenant, status), value in expected.items():
        assert sample(text, "embedding_jobs", {"tenant": tenant, "status": status}) == value
    assert sample(text, "embedding_jobs_stuck", {"tenant": "globex", "status": "pending"}) == 1
    assert sample(text, "embedding_jobs_stuck", {"tenant": "acme", "status": "pending"}) == 0
    oldest = sample(text, "embedding_jobs_stuck_oldest_age_seconds", {"tenant": "globex", "status": "pending"})
    assert oldest is not None
    assert 3 * 3600 - 5 < oldest < 3 * 3600 + 60
    assert sample(text, "embedding_exporter_store_refresh_errors_total", {}) == 0
    last = sample(text, "embedding_exporter_store_last_success_timestamp_seconds", {})
    assert last is not None
    assert last > 0


async def test_dead_store_keeps_the_last_snapshot_and_counts_errors(
    aiohttp_client: AiohttpClient, seeded_store: SQLiteJobStore
) -> None:
    app = create_app(Settings(metrics_cache_ttl=0, refresh_interval=3600), seeded_store)
    client = await aiohttp_client(app)
    await asyncio.wait_for(app[STATE].refreshed.wait(), 10)
    before = sample(await scrape(client), "embedding_exporter_store_last_success_timestamp_seconds", {})
    await seeded_store.close()
    assert await app[STATE].refresh() is False
    text = await scrape(client)
    assert sample(text, "embedding_jobs", {"tenant": "acme", "status": "completed"}) == 3
    assert sample(text, "embedding_exporter_store_refresh_errors_total", {}) == 1
    assert sample(text, "embedding_exporter_store_last_success_timestamp_seconds", {}) == before
    ready = await client.get("/readyz")
    assert ready.status == 503
    assert (await ready.json())["error"]["code"] == "store_unavailable"
    assert (await client.get("/healthz")).status == 200


async def test_slow_store_never_blocks_a_scrape(aiohttp_client: AiohttpClient, seeded_store: SQLiteJobStore) -> None:
    gate = asyncio.Event()

    class SlowStore:
        def __getattr__(self, name: str) -> object:
            return getattr(seeded_store, name)

        async def stats_all(self) -> dict[str, dict[JobStatus, int]]:
            await gate.wait()
            return await seeded_store.stats_all()

    app = create_app(Settings(metrics_cache_ttl=0, refresh_timeout=0.2, refresh_interval=3600), SlowStore())  # type: ignore[arg-type]
    client = await aiohttp_client(app)
    text = await asyncio.wait_for(scrape(client), 2)
    assert "embedding_jobs" in text

    async def errored() -> bool:
        return sample(await scrape(client), "embedding_exporter_store_refresh_errors_total", {}) == 1

    deadline = asyncio.get_running_loop().time() + 10
    while not await errored():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)
    gate.set()


@pytest.mark.parametrize("detail", ["compact", "full"])
async def test_event_metrics_equal_what_the_worker_processed(tmp_path: Path, detail: str) -> None:
    registry = CollectorRegistry()
    span_metrics = SpanMetrics(registry, detail=detail)
    async with pipeline(tmp_path, processors=[MetricsSpanProcessor(span_metrics)]) as p:
        ok = [await p.ingest("acme", f"ok-{n}", f"{TEXT} {n}") for n in range(4)]
        flaky = await p.ingest("acme", "flaky", "FAIL_ONCE " + TEXT)
        dead = await p.ingest("globex", "dead", "FAIL_ALWAYS " + TEXT)
        p.start()
        for job in [*ok, flaky]:
            await p.wait_for_status("acme", job.id, S.COMPLETED)
        await p.wait_for_status("globex", dead.id, S.DEAD_LETTERED)
        await p.wait_idle()
        vectors = 0
        for job in [*ok, flaky]:
            stored = await p.store.get("acme", job.id)
            vectors += stored.metadata.vector_count or 0

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("embedding_job_attempts_total", tenant="acme", outcome="completed") == 5
    assert value("embedding_job_attempts_total", tenant="acme", outcome="failed") == 1
    assert value("embedding_job_attempts_total", tenant="acme", outcome="dead_lettered") == 0
    assert value("embedding_job_attempts_total", tenant="globex", outcome="failed") == 2
    assert value("embedding_job_attempts_total", tenant="globex", outcome="dead_lettered") == 1
    assert value("embedding_vectors_total", tenant="acme") == vectors
    if detail == "full":
        assert value("embedding_job_duration_seconds_count", tenant="acme", outcome="completed") == 5
        assert value("embedding_job_duration_seconds_count", tenant="acme", outcome="failed") == 1
    else:
        assert value("embedding_job_duration_seconds_count", tenant="acme") == 6
    assert value("embedding_job_queue_wait_seconds_count", tenant="acme") == 6
    job_spans = [s for s in p.spans.get_finished_spans() if s.name == attr.JOB_SPAN]
    measured = sum(
        (s.end_time - s.start_time) / 1e9
        for s in job_spans
        if s.end_time and s.start_time and (s.attributes or {}).get(attr.TENANT) == "acme"
    )
    if detail == "full":
        total = sum(
            value("embedding_job_duration_seconds_sum", tenant="acme", outcome=o) or 0 for o in ("completed", "failed")
        )
    else:
        total = value("embedding_job_duration_seconds_sum", tenant="acme") or 0
    assert total == pytest.approx(measured)
    assert value("embedding_exporter_spans_received_total", source="in_process") == 9


@dataclass
class Exporter:
    """Clients of the two listeners of one exporter: /metrics and the API, and the OTLP receiver."""

    api: Client
    otlp: Client


@pytest.fixture
async def exporter(aiohttp_client: AiohttpClient, tmp_path: Path) -> AsyncIterator[Exporter]:
    store = await SQLiteJobStore.open(tmp_path / "jobs.db")
    app = create_app(Settings(metrics_cache_ttl=0, tenant_label_limit=2), store)
    yield Exporter(await aiohttp_client(app), await receiver_of(aiohttp_client, app))
    await store.close()


async def test_otlp_protobuf_spans_become_metrics(exporter: Exporter) -> None:
    body = job_span_request("acme", "completed", n=3).SerializeToString()
    response = await exporter.otlp.post("/v1/traces", data=body, headers={"Content-Type": "application/x-protobuf"})
    assert response.status == 200
    assert response.content_type == "application/x-protobuf"
    text = await scrape(exporter.api)
    assert sample(text, "embedding_job_attempts_total", {"tenant": "acme", "outcome": "completed"}) == 3
    assert sample(text, "embedding_vectors_total", {"tenant": "acme"}) == 9
    assert sample(text, "embedding_job_queue_wait_seconds_count", {"tenant": "acme"}) == 3
    assert sample(text, "embedding_exporter_spans_received_total", {"source": "otlp"}) == 3


async def test_otlp_accepts_gzip_and_json(exporter: Exporter) -> None:
    from google.protobuf import json_format

    gz = gzip.compress(job_span_request("acme", "failed").SerializeToString())
    response = await exporter.otlp.post(
        "/v1/traces", data=gz, headers={"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"}
    )
    assert response.status == 200
    as_json = json_format.MessageToJson(job_span_request("acme", "failed"))
    response = await exporter.otlp.post("/v1/traces", data=as_json, headers={"Content-Type": "application/json"})
    assert response.status == 200
    assert response.content_type == "application/json"
    assert (
        sample(await scrape(exporter.api), "embedding_job_attempts_total", {"tenant": "acme", "outcome": "failed"}) == 2
    )


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        (b"\x0a\xff\xff", {"Content-Type": "application/x-protobuf"}, 400),
        (b"{not json", {"Content-Type": "application/json"}, 400),
        (b"x", {"Content-Type": "text/plain"}, 415),
        (b"x", {"Content-Type": "application/x-protobuf", "Content-Encoding": "compress"}, 415),
        (b"not gzip", {"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"}, 400),
    ],
)
async def test_otlp_bad_requests_get_a_status_error(
    exporter: Exporter, body: bytes, headers: dict[str, str], status: int
) -> None:
    from google.rpc import status_pb2

    response = await exporter.otlp.post("/v1/traces", data=body, headers=headers)
    assert response.status == status
    if response.content_type == "application/x-protobuf":
        error = status_pb2.Status()
        error.ParseFromString(await response.read())
        assert error.message


async def test_gzip_bomb_is_refused(exporter: Exporter) -> None:
    bomb = gzip.compress(b"\x00" * (70 * 1024 * 1024))
    response = await exporter.otlp.post(
        "/v1/traces", data=bomb, headers={"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"}
    )
    assert response.status == 413


async def test_tenants_past_the_label_limit_fold_into_other(exporter: Exporter) -> None:
    for tenant in ("t1", "t2", "t3", "t4"):
        body = job_span_request(tenant, "completed").SerializeToString()
        await exporter.otlp.post("/v1/traces", data=body, headers={"Content-Type": "application/x-protobuf"})
    text = await scrape(exporter.api)
    assert sample(text, "embedding_job_attempts_total", {"tenant": "t1", "outcome": "completed"}) == 1
    assert sample(text, "embedding_job_attempts_total", {"tenant": "t2", "outcome": "completed"}) == 1
    assert sample(text, "embedding_job_attempts_total", {"tenant": "t3", "outcome": "completed"}) is None
    assert sample(text, "embedding_job_attempts_total", {"tenant": "__other__", "outcome": "completed"}) == 2
    assert sample(text, "embedding_exporter_tenants_folded", {}) == 2


async def test_exemplars_carry_trace_ids_in_openmetrics(exporter: Exporter) -> None:
    request = job_span_request("acme", "completed")
    trace_id = request.resource_spans[0].scope_spans[0].spans[0].trace_id.hex()
    await exporter.otlp.post(
        "/v1/traces", data=request.SerializeToString(), headers={"Content-Type": "application/x-protobuf"}
    )
    openmetrics = await scrape(exporter.api, "application/openmetrics-text; version=1.0.0")
    assert f'# {{trace_id="{trace_id}"}}' in openmetrics
    plain = await scrape(exporter.api)
    assert "trace_id" not in plain


async def test_metrics_token_protects_metrics(aiohttp_client: AiohttpClient, tmp_path: Path) -> None:
    store = await SQLiteJobStore.open(tmp_path / "jobs.db")
    try:
        client = await aiohttp_client(
            create_app(Settings(metrics_cache_ttl=0, metrics_token="scrape-token-0123456789"), store)
        )
        assert (await client.get("/metrics")).status == 401
        ok = await client.get("/metrics", headers={"Authorization": "Bearer scrape-token-0123456789"})
        assert ok.status == 200
    finally:
        await store.close()


async def test_promtool_accepts_the_exposition(exporter: Exporter, tmp_path: Path) -> None:
    promtool = require_binary("promtool", "apt-get install prometheus")
    for outcome in ("completed", "failed", "dead_lettered"):
        body = job_span_request("acme", outcome).SerializeToString()
        await exporter.otlp.post("/v1/traces", data=body, headers={"Content-Type": "application/x-protobuf"})
    text = await scrape(exporter.api)
    proc = await asyncio.create_subprocess_exec(
        promtool, "check", "metrics", stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    output, _ = await proc.communicate(text.encode())
    assert proc.returncode == 0, output.decode()


async def test_received_spans_are_forwarded_upstream_and_failures_counted(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    received: list[ExportTraceServiceRequest] = []
    refuse = False

    async def upstream_traces(request: web.Request) -> web.Response:
        if refuse:
            return web.Response(status=503)
        export = ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        received.append(export)
        return web.Response(content_type="application/x-protobuf")

    upstream_app = web.Application()
    upstream_app.router.add_post("/v1/traces", upstream_traces)
    upstream = await aiohttp_server(upstream_app)
    store = await SQLiteJobStore.open(tmp_path / "jobs.db")
    try:
        settings = Settings(metrics_cache_ttl=0, forward_otlp_endpoint=str(upstream.make_url("/")))
        app = create_app(settings, store)
        client, receiver = await aiohttp_client(app), await receiver_of(aiohttp_client, app)
        request = job_span_request("acme", "completed", n=2)
        headers = {"Content-Type": "application/x-protobuf"}
        assert (await receiver.post("/v1/traces", data=request.SerializeToString(), headers=headers)).status == 200

        async def forwarded(count: int, dropped: float | None = None) -> None:
            deadline = asyncio.get_running_loop().time() + 10
            while True:
                text = await scrape(client)
                sent = sample(text, "embedding_exporter_forward_sent_total", {})
                refused = sample(text, "embedding_exporter_forward_dropped_total", {"reason": "http_503"})
                if sent == count and (dropped is None or refused == dropped):
                    return
                assert asyncio.get_running_loop().time() < deadline, text
                await asyncio.sleep(0.02)

        await forwarded(1)
        assert received == [request]
        refuse = True
        assert (await receiver.post("/v1/traces", data=request.SerializeToString(), headers=headers)).status == 200
        await forwarded(1, dropped=1)
        # Metrics are made locally whatever upstream does.
        text = await scrape(client)
        assert sample(text, "embedding_job_attempts_total", {"tenant": "acme", "outcome": "completed"}) == 4
    finally:
        await store.close()


@pytest.mark.parametrize(("limit", "initialised"), [(1000, {"acme", "globex"}), (1, {"acme"})])
async def test_tenants_the_store_knows_have_zero_attempt_counters_before_their_first_span(
    aiohttp_client: AiohttpClient, seeded_store: SQLiteJobStore, limit: int, initialised: set[str]
) -> None:
    app = create_app(Settings(metrics_cache_ttl=0, tenant_label_limit=limit), seeded_store)
    client = await aiohttp_client(app)
    await asyncio.wait_for(app[STATE].refreshed.wait(), 10)
    text = await scrape(client)
    for tenant in ("acme", "globex"):
        for outcome in ("completed", "failed", "dead_lettered"):
            value = sample(text, "embedding_job_attempts_total", {"tenant": tenant, "outcome": outcome})
            # Within the label limit a known tenant starts at 0; past it, it gets no series of its own.
            assert value == (0 if tenant in initialised else None), (tenant, outcome)
        assert sample(text, "embedding_vectors_total", {"tenant": tenant}) == (0 if tenant in initialised else None)
    # Histograms come with the first span: a zero-initialised tenant costs 4 samples, not a full set.
    assert 'embedding_job_duration_seconds_count{tenant="acme"}' not in text
