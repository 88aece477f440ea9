"""The OTLP receiver's door: its own listener, loopback unless a token guards it, validated spans.

The process tests start the real `embedding-jobs exporter` and talk to both of its listeners
over TCP, as a worker in the pod and a caller from elsewhere would.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import pytest
from google.protobuf import json_format
from google.rpc import status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp.plugin import AiohttpClient

from exporter.app import create_app
from exporter.otlp import check_listener, is_loopback
from jobs import telemetry as attr
from jobs.settings import Settings
from jobs.sqlite_store import SQLiteJobStore
from tests.components import wait_until
from tests.helpers.cli import cli_env, run_cli
from tests.helpers.exporter import ExporterProcess, exporter_process
from tests.helpers.metrics import job_span_request, receiver_of

PROTOBUF = {"Content-Type": "application/x-protobuf"}
TOKEN = "otlp-token-0123456789abcdef"
API_TOKEN = "api-operator-token-0123456789"
NOW_NS = 1_700_000_000 * 10**9
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def forged_span(tenant: str, *, seconds: float = 1.0, queue_wait: float = 0.5, outcome: str = "completed") -> Span:
    """A job span written by hand, as anyone able to reach the receiver could send it."""
    span = Span(
        name=attr.JOB_SPAN,
        kind=Span.SpanKind.SPAN_KIND_CONSUMER,
        trace_id=bytes(range(1, 17)),
        span_id=bytes(range(1, 9)),
        start_time_unix_nano=NOW_NS,
        end_time_unix_nano=NOW_NS + int(seconds * 1e9),
    )
    span.attributes.extend(
        [
            KeyValue(key=attr.TENANT, value=AnyValue(string_value=tenant)),
            KeyValue(key=attr.OUTCOME, value=AnyValue(string_value=outcome)),
            KeyValue(key=attr.QUEUE_WAIT, value=AnyValue(double_value=queue_wait)),
            KeyValue(key=attr.VECTOR_COUNT, value=AnyValue(int_value=3)),
        ]
    )
    return span


def export_of(spans: Sequence[Span]) -> bytes:
    """One serialized ExportTraceServiceRequest carrying spans."""
    request = ExportTraceServiceRequest(resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=spans)])])
    return request.SerializeToString()


def exposition(text: str) -> Samples:
    """Every sample of an exposition by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def metrics_of(session: aiohttp.ClientSession, exporter: ExporterProcess) -> Samples:
    async with session.get(f"{exporter.base}/metrics") as response:
        assert response.status == 200
        return exposition(await response.text())


async def raw_post(base: str, authorization: bytes, body: bytes) -> int:
    """POST /v1/traces with an Authorization header of raw bytes (clients refuse to send non-ASCII ones)."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            b"POST /v1/traces HTTP/1.1\r\nHost: exporter\r\nContent-Type: application/x-protobuf\r\n"
            b"Authorization: " + authorization + b"\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
        )
        status_line = await asyncio.wait_for(reader.readline(), 10)
        return int(status_line.split()[1])
    finally:
        writer.close()
        await writer.wait_closed()


# -- where the receiver listens -------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("localhost", True),
        ("LocalHost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("10.1.2.3", False),
        ("exporter.jobs.svc", False),
    ],
)
def test_only_loopback_addresses_may_listen_without_a_token(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
    check_listener(host, TOKEN)
    if loopback:
        check_listener(host, "")
    else:
        with pytest.raises(ValueError, match="EMBEDDING_JOBS_OTLP_TOKEN"):
            check_listener(host, "")


def test_the_exporter_refuses_to_start_an_open_receiver_off_loopback(tmp_path: Path) -> None:
    refused = run_cli(tmp_path, "exporter", "--otlp-host", "0.0.0.0", "--exporter-port", "0")
    assert refused.returncode == 2
    assert "without a token, open to anyone who reaches it" in refused.stderr
    assert "EMBEDDING_JOBS_OTLP_TOKEN" in refused.stderr
    assert not (tmp_path / "embedding-jobs.db").exists(), "it opened the store before refusing"


async def test_the_api_listener_does_not_serve_spans_and_the_receiver_serves_nothing_else(tmp_path: Path) -> None:
    info = {"EMBEDDING_JOBS_LOG_LEVEL": "INFO"}
    async with exporter_process(tmp_path, env=info) as exporter, aiohttp.ClientSession() as session:
        body = export_of([forged_span("acme")])
        async with session.post(f"{exporter.base}/v1/traces", data=body, headers=PROTOBUF) as response:
            assert response.status == 404
        async with session.post(f"{exporter.otlp_base}/v1/traces", data=body, headers=PROTOBUF) as response:
            assert response.status == 200
            assert response.headers["X-Content-Type-Options"] == "nosniff"
        for path in ("/metrics", "/healthz", "/api/v1/embedding-jobs/stats", "/"):
            async with session.get(f"{exporter.otlp_base}{path}") as response:
                assert response.status == 404, path
        log = exporter.log_text()
    otlp_port = exporter.otlp_base.rsplit(":", 1)[1]
    assert f"OTLP receiver on http://127.0.0.1:{otlp_port}/v1/traces (OTLP token off)" in log, log
    assert f"on {exporter.base}/ (API tokens off, metrics token off)" in log, log


# -- the token ------------------------------------------------------------------------------


async def test_a_token_guards_the_receiver_and_a_worker_sending_it_gets_in(tmp_path: Path) -> None:
    corpus = "\n".join(json.dumps({"tenantId": "acme", "shardId": f"s{n}", "text": f"text {n}"}) for n in range(4))
    assert run_cli(tmp_path, "ingest", "-", stdin=corpus).returncode == 0
    env = {
        "EMBEDDING_JOBS_OTLP_TOKEN": TOKEN,
        "EMBEDDING_JOBS_API_TOKENS": f"{API_TOKEN}=*",
        "EMBEDDING_JOBS_LOG_LEVEL": "INFO",
    }
    # Every address, as a cross-pod receiver listens: allowed because a token is set.
    async with (
        exporter_process(tmp_path, "--otlp-host", "0.0.0.0", "--metrics-cache-ttl", "0", env=env) as exporter,
        aiohttp.ClientSession() as session,
    ):
        body = export_of([forged_span("intruder", seconds=1e6)])
        url = f"{exporter.otlp_base}/v1/traces"
        refused = [
            {},
            {"Authorization": TOKEN},
            {"Authorization": "Bearer"},
            {"Authorization": "Bearer wrong-token-0123456789abcd"},
            {"Authorization": f"Bearer {TOKEN}x"},
            {"Authorization": f"Basic {TOKEN}"},
            {"Authorization": f"Bearer {API_TOKEN}"},
        ]
        for headers in refused:
            async with session.post(url, data=body, headers={**PROTOBUF, **headers}) as response:
                assert response.status == 401, headers
                assert response.headers["WWW-Authenticate"] == "Bearer"
                error = status_pb2.Status()
                error.ParseFromString(await response.read())
                assert error.code == 16
                assert "bearer token" in error.message
        json_headers = {"Content-Type": "application/json"}
        async with session.post(url, data=b"{}", headers=json_headers) as response:
            assert response.status == 401
            assert response.content_type == "application/json"
            assert "bearer token" in json_format.Parse(await response.read(), status_pb2.Status()).message
        # Bytes that are not UTF-8, and UTF-8 that is not ASCII: refused, never a server error.
        for raw in (b"Bearer \xff\xfe\xfd", b"Bearer " + "t\u00f6ken-\u00e9\u00e9\u00e9".encode(), b"\xc3\x28 x"):
            assert await raw_post(exporter.otlp_base, raw, body) == 401, raw
        text = await metrics_of(session, exporter)
        assert not [key for key in text if ("tenant", "intruder") in key[1]]
        assert text[("embedding_exporter_spans_received_total", (("source", "otlp"),))] == 0

        worker = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "embedding_jobs",
            "worker",
            "--exit-when-idle",
            "--otlp-endpoint",
            exporter.otlp_base,
            env=cli_env(tmp_path, EMBEDDING_JOBS_OTLP_TOKEN=TOKEN),
            stderr=subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(worker.communicate(), 40)
        assert worker.returncode == 0, err.decode()
        completed = ("embedding_job_attempts_total", (("outcome", "completed"), ("tenant", "acme")))

        async def arrived() -> bool:
            return (await metrics_of(session, exporter)).get(completed) == 4

        await wait_until(arrived, "the worker's spans, sent with the token", within=20)
        log = exporter.log_text()
    assert "(API tokens on, metrics token off)" in log, log
    assert "(OTLP token on)" in log, log
    assert TOKEN not in log
    assert API_TOKEN not in log


# -- what anonymous senders on loopback can and cannot do -----------------------------------


async def test_anonymous_junk_neither_pushes_a_store_tenant_out_nor_corrupts_its_sums(tmp_path: Path) -> None:
    args = ("--tenant-label-limit", "100", "--refresh-interval", "0.2", "--metrics-cache-ttl", "0")
    async with exporter_process(tmp_path, *args) as exporter, aiohttp.ClientSession() as session:
        url = f"{exporter.otlp_base}/v1/traces"
        junk = export_of([forged_span(f"junk-{n:03d}") for n in range(600)])
        async with session.post(url, data=junk, headers=PROTOBUF) as response:
            assert response.status == 200
        text = await metrics_of(session, exporter)
        assert text[("embedding_exporter_tenants_folded", ())] == 500

        # A tenant the store gets to know after the junk arrived.
        shard = json.dumps({"tenantId": "acme", "shardId": "s1", "text": "some text"})
        assert run_cli(tmp_path, "ingest", "-", stdin=shard).returncode == 0
        pending = ("embedding_jobs", (("status", "pending"), ("tenant", "acme")))

        async def known() -> bool:
            return (await metrics_of(session, exporter)).get(pending) == 1

        await wait_until(known, "the store's new tenant under its own label", within=20)
        good = export_of([forged_span("acme", seconds=2.0, queue_wait=0.5)])
        async with session.post(url, data=good, headers=PROTOBUF) as response:
            assert response.status == 200
        # A queue wait of +Inf and an attempt of 9.2e9 s (292 years), as one anonymous span set them on main.
        forged = export_of([forged_span("acme", queue_wait=math.inf), forged_span("acme", seconds=9.2e9)])
        async with session.post(url, data=forged, headers=PROTOBUF) as response:
            assert response.status == 200
        text = await metrics_of(session, exporter)
    acme = (("tenant", "acme"),)
    assert text[("embedding_job_attempts_total", (("outcome", "completed"), ("tenant", "acme")))] == 1
    assert text[("embedding_job_duration_seconds_sum", acme)] == 2.0
    assert text[("embedding_job_duration_seconds_count", acme)] == 1
    assert text[("embedding_job_queue_wait_seconds_sum", acme)] == 0.5
    assert text[("embedding_exporter_spans_dropped_total", (("reason", "invalid_value"),))] == 2
    assert text[("embedding_exporter_spans_received_total", (("source", "otlp"),))] == 601
    assert text[("embedding_exporter_tenants_evicted_total", ())] == 1
    labelled = {dict(labels).get("tenant") for _, labels in text} - {None, "__other__"}
    assert "acme" in labelled
    assert len(labelled) == 100


async def test_receiver_app_answers_protobuf_and_json_errors_with_nosniff(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    store = await SQLiteJobStore.open(tmp_path / "jobs.db")
    try:
        app = create_app(Settings(metrics_cache_ttl=0, otlp_token=TOKEN), store)
        receiver = await receiver_of(aiohttp_client, app)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        body = job_span_request("acme", "completed").SerializeToString()
        for headers, status in (
            ({**PROTOBUF, **auth}, 200),
            ({"Content-Type": "application/json", **auth}, 400),
            ({"Content-Type": "text/plain", **auth}, 415),
            (PROTOBUF, 401),
        ):
            response = await receiver.post("/v1/traces", data=body, headers=headers)
            assert response.status == status, headers
            assert response.headers["X-Content-Type-Options"] == "nosniff"
    finally:
        await store.close()
