"""Every command's spans go through its process's tracer provider: ingest and manual retries are traced too.

The commands run as real processes and export over OTLP/HTTP to a collector that decodes what
arrives with the OTLP protobuf schema, as a trace backend would. (The exporter's own receiver
keeps only `embedding.job` spans, so it cannot show producer spans.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from pytest_aiohttp.plugin import AiohttpServer

from jobs import telemetry as attr
from jobs.model import Job, JobStatus, truncate_error
from jobs.sqlite_store import SQLiteJobStore
from tests.components import wait_until
from tests.helpers.cli import cli_env, run_cli
from tests.helpers.exporter import exporter_process
from worker.local_queue import LocalQueue
from worker.messages import JobMessage, message_id_for, parse_message
from worker.producer import Producer, job_id_for
from worker.shards import Shard, SQLiteShardStore
from worker.tracing import get_tracer

PRODUCER_KIND = 4  # opentelemetry.proto.trace.v1.Span.SPAN_KIND_PRODUCER


@dataclass(frozen=True)
class CollectedSpan:
    """One span as it arrived over OTLP, with the service that sent it."""

    service: str
    name: str
    kind: int
    trace_id: str
    attributes: dict[str, str]


@dataclass
class Collector:
    """An OTLP/HTTP traces endpoint that keeps every span it is sent."""

    endpoint: str
    spans: list[CollectedSpan] = field(default_factory=list)

    def named(self, name: str) -> list[CollectedSpan]:
        """The spans of that name received so far."""
        return [s for s in self.spans if s.name == name]


@pytest.fixture
async def collector(aiohttp_server: AiohttpServer) -> Collector:
    found = Collector("")

    async def traces(request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        for resource_spans in export.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    found.spans.append(
                        CollectedSpan(
                            service=resource.get("service.name", ""),
                            name=span.name,
                            kind=span.kind,
                            trace_id=span.trace_id.hex(),
                            attributes={a.key: a.value.string_value for a in span.attributes},
                        )
                    )
        body = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=body, content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    server = await aiohttp_server(app)
    found.endpoint = str(server.make_url("")).rstrip("/")
    return found


async def test_ingest_exports_a_producer_span_per_enqueued_job_to_the_otlp_endpoint(
    tmp_path: Path, collector: Collector
) -> None:
    corpus = "\n".join(json.dumps({"tenantId": "acme", "shardId": f"s{n}", "text": f"text {n}"}) for n in range(3))
    ingest = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "embedding_jobs",
        "ingest",
        "-",
        "--otlp-endpoint",
        collector.endpoint,
        env=cli_env(tmp_path),
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(ingest.communicate(corpus.encode()), 40)
    assert ingest.returncode == 0, err.decode()
    # The provider is shut down before the process exits, which sends what it holds: no waiting.
    spans = collector.named(attr.ENQUEUE_SPAN)
    async with await SQLiteJobStore.open(tmp_path / "embedding-jobs.db") as store:
        jobs = (await store.list("acme")).items
    assert len(jobs) == 3
    assert {s.attributes[attr.JOB_ID]: s.trace_id for s in spans} == {job.id: job.trace_id for job in jobs}
    assert all(s.kind == PRODUCER_KIND and s.service == "embedding-jobs-ingest" for s in spans)
    assert {s.attributes[attr.MESSAGING_MESSAGE_ID] for s in spans} == {job.id for job in jobs}


async def test_a_manual_retry_through_the_api_is_traced_and_continued_by_the_worker(
    tmp_path: Path, collector: Collector
) -> None:
    # A dead-lettered job whose message is gone, so the retry's message is the only one.
    shard = Shard("acme", "s1", "document", "some text")
    shards = await SQLiteShardStore.open(tmp_path / "embedding-jobs.db")
    await shards.put(shard)
    await shards.close()
    async with await SQLiteJobStore.open(tmp_path / "embedding-jobs.db") as store:
        job = Job.new(job_id=job_id_for(shard), tenant_id="acme", shard_id="s1", shard_type_id="document")
        await store.create(job)
        await store.transition("acme", job.id, JobStatus.PENDING, JobStatus.DEAD_LETTERED, error="gave up")
    args = ("--otlp-endpoint", collector.endpoint)
    async with (
        exporter_process(tmp_path, *args) as exporter,
        aiohttp.ClientSession() as session,
    ):
        url = f"{exporter.base}/api/v1/embedding-jobs/{job.id}/retry?tenantId=acme"
        async with session.post(url) as response:
            assert response.status == 202, await response.text()

        async def exported() -> bool:
            return bool(collector.named(attr.ENQUEUE_SPAN))

        await wait_until(exported, "the retry's producer span at the OTLP endpoint", within=20)
    [span] = collector.named(attr.ENQUEUE_SPAN)
    assert (span.kind, span.service, span.attributes[attr.JOB_ID]) == (PRODUCER_KIND, "embedding-jobs-exporter", job.id)
    assert span.attributes[attr.MESSAGING_MESSAGE_ID].startswith(f"{job.id}.manual-")
    assert run_cli(tmp_path, "worker", "--exit-when-idle").returncode == 0
    async with await SQLiteJobStore.open(tmp_path / "embedding-jobs.db") as store:
        done = await store.get("acme", job.id)
    assert done.status is JobStatus.COMPLETED
    # The worker's attempt continued the retry's trace, carried in the message.
    assert done.trace_id == span.trace_id


async def test_resend_sends_a_recorded_jobs_message_under_its_own_id_without_the_store(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    store = await SQLiteJobStore.open(tmp_path / "jobs.db")
    job = Job.new(job_id="job-1", tenant_id="acme", shard_id="s1", shard_type_id="document")
    await store.create(job)
    await store.transition("acme", job.id, JobStatus.PENDING, JobStatus.DEAD_LETTERED, error="gave up")
    await store.transition("acme", job.id, JobStatus.DEAD_LETTERED, JobStatus.PENDING, retry_count=0)
    pending = await store.get("acme", job.id)
    # A closed store fails any call (a create would be refused and logged): the resend must not make one.
    await store.close()
    async with LocalQueue(tmp_path / "queue.db") as queue:
        with caplog.at_level(logging.WARNING):
            await Producer(store, queue, get_tracer(provider)).resend(pending)
        [message] = await queue.receive(max_wait=5)
    assert not caplog.records, caplog.text
    [span] = spans.get_finished_spans()
    assert span.kind is SpanKind.PRODUCER
    assert message.message_id == message_id_for(job.id, manual_retry_at=pending.updated_at)
    assert span.attributes is not None
    assert span.attributes[attr.MESSAGING_MESSAGE_ID] == message.message_id
    assert parse_message(message.body) == JobMessage("job-1", "acme", "s1", "document")
    assert span.context is not None
    assert f"{span.context.trace_id:032x}-{span.context.span_id:016x}" in message.application_properties["traceparent"]


def test_every_send_of_a_job_gets_a_message_id_of_its_own() -> None:
    first = datetime(2026, 1, 2, 3, 4, 5, 600_000, tzinfo=UTC)
    ids = [
        message_id_for("job-1"),
        message_id_for("job-1", 1),
        message_id_for("job-1", 2),
        message_id_for("job-1", manual_retry_at=first),
        message_id_for("job-1", manual_retry_at=first.replace(microsecond=600_001)),
    ]
    assert ids[:4] == ["job-1", "job-1.retry-1", "job-1.retry-2", "job-1.manual-20260102T030405600000"]
    assert len(set(ids)) == len(ids)
    assert JobMessage("job-1", "acme", "s1", "document").retry().retry().message_id == "job-1.retry-2"


def test_truncated_errors_keep_their_bound_and_mark_the_cut() -> None:
    assert truncate_error("x" * 5000) == "x" * 1999 + "…"
    assert truncate_error("x" * 5000, 1024) == "x" * 1023 + "…"
    assert truncate_error("x" * 1024, 1024) == "x" * 1024
