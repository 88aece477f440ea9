"""The worker's tracking health reaches Prometheus: over OTLP from a worker process to a separate
exporter process, and read in process by `up`. Real processes, the Cosmos test server's faults."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient
from google.protobuf import json_format
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from prometheus_client import CollectorRegistry
from pytest_aiohttp.plugin import AiohttpClient

from exporter.app import create_app
from exporter.workerhealth import WorkerHealth
from jobs import telemetry as attr
from jobs.settings import Settings
from jobs.sqlite_store import SQLiteJobStore
from tests.components import free_port, wait_until
from tests.conftest import CosmosDatabase
from tests.helpers.cli import cli_env, cosmos_env, run_cli
from tests.helpers.exporter import exporter_process
from tests.helpers.metrics import receiver_of, samples

Client = TestClient[web.Request, web.Application]
PROTOBUF = {"Content-Type": "application/x-protobuf"}

JOB_CONTAINER = "embedding-jobs"
BUFFER = 5
JOBS = 12
PREFIX = "embedding_worker_tracking_"


def by_worker(text: str, name: str) -> dict[str, float]:
    """{worker: value} of one embedding_worker_tracking_* sample name."""
    return {dict(labels)["worker"]: value for labels, value in samples(text, PREFIX + name).items()}


async def scrape(session: aiohttp.ClientSession, base: str) -> str:
    async with session.get(f"{base}/metrics") as response:
        assert response.status == 200
        return await response.text()


async def run_worker(data_dir: Path, env: dict[str, str]) -> str:
    """`embedding-jobs worker --exit-when-idle` to the end; its stderr."""
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "embedding_jobs", "worker", "--exit-when-idle", env=env, stderr=subprocess.PIPE
    )
    _, err = await asyncio.wait_for(worker.communicate(), 60)
    assert worker.returncode == 0, err.decode()
    return err.decode()


async def test_failing_job_store_shows_as_failed_buffered_and_dropped_writes_on_the_exporter(
    tmp_path: Path, cosmos_db: CosmosDatabase
) -> None:
    cosmos = cosmos_env(cosmos_db)
    assert run_cli(tmp_path, "init-db", **cosmos).returncode == 0
    corpus = "\n".join(json.dumps({"tenantId": "acme", "shardId": f"s{n}", "text": f"text {n}"}) for n in range(JOBS))
    ingested = run_cli(tmp_path, "ingest", "-", stdin=corpus, **cosmos)
    assert ingested.returncode == 0, ingested.stderr
    async with exporter_process(tmp_path, env=cosmos) as exporter, aiohttp.ClientSession() as session:
        # No worker has reported yet: the families are there, without series.
        assert by_worker(await scrape(session, exporter.base), "dropped_writes_total") == {}
        env = cli_env(
            tmp_path,
            **cosmos,
            EMBEDDING_JOBS_OTLP_ENDPOINT=exporter.otlp_base,
            EMBEDDING_JOBS_TRACKING_BUFFER=str(BUFFER),
            EMBEDDING_JOBS_STORE_TIMEOUT="1",
            EMBEDDING_JOBS_RECONCILE_INTERVAL="0",
            OTEL_METRIC_EXPORT_INTERVAL="200",
        )
        try:
            await asyncio.to_thread(cosmos_db.server.set_fault, JOB_CONTAINER, "fail")
            # Every job is embedded while no status write lands: BUFFER writes wait, the rest are dropped.
            await run_worker(tmp_path, env)
        finally:
            await asyncio.to_thread(cosmos_db.server.set_fault, JOB_CONTAINER, None)
        text = await scrape(session, exporter.base)
        [first] = by_worker(text, "buffered_writes")
        assert by_worker(text, "buffered_writes")[first] == BUFFER
        assert by_worker(text, "store_failures_total")[first] >= 1
        # Two writes a job (begin, finish); the buffer kept BUFFER of them.
        assert by_worker(text, "dropped_writes_total")[first] == 2 * JOBS - BUFFER
        assert by_worker(text, "replayed_writes_total")[first] == 0
        assert by_worker(text, "adopted_writes_total")[first] == 0

        # The store is back: the next worker on this data folder adopts the spool and replays it.
        await run_worker(tmp_path, env)
        text = await scrape(session, exporter.base)
        [second] = set(by_worker(text, "buffered_writes")) - {first}
        assert by_worker(text, "adopted_writes_total")[second] == BUFFER
        assert by_worker(text, "replayed_writes_total")[second] == BUFFER
        assert by_worker(text, "buffered_writes")[second] == 0
        assert by_worker(text, "dropped_writes_total")[second] == 0
        assert by_worker(text, "store_failures_total")[second] == 0
        assert "Traceback" not in exporter.log_text()


async def test_up_serves_its_worker_tracking_health_from_zero(tmp_path: Path) -> None:
    port = free_port()
    up = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "embedding_jobs",
        "up",
        "--no-sample",
        "--exporter-port",
        str(port),
        env=cli_env(tmp_path),
        stderr=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            text = ""

            async def reported() -> bool:
                nonlocal text
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    text = await scrape(session, base)
                return bool(by_worker(text, "dropped_writes_total"))

            await wait_until(reported, "up to serve its worker's tracking health", within=30)
        for name in ("store_failures_total", "dropped_writes_total", "replayed_writes_total", "buffered_writes"):
            assert list(by_worker(text, name).values()) == [0], name
    finally:
        up.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(up.wait(), 20) == 0


def tracking_request(worker: str, **values: int) -> ExportMetricsServiceRequest:
    """A metrics export as the worker's SDK sends it: counters as cumulative sums, the buffer as a gauge."""
    export = ExportMetricsServiceRequest()
    resource = export.resource_metrics.add()
    resource.resource.attributes.add(key=attr.SERVICE_INSTANCE_ID, value=AnyValue(string_value=worker))
    scope = resource.scope_metrics.add()
    scope.metrics.add(name="http.client.duration").gauge.data_points.add(as_double=3.5)
    for name, value in values.items():
        metric = scope.metrics.add(name=attr.TRACKING_METRIC_PREFIX + name)
        if name in attr.TRACKING_GAUGES:
            metric.gauge.data_points.add(as_int=value)
        else:
            metric.sum.is_monotonic = True
            metric.sum.data_points.add(as_int=value)
    return export


async def test_metrics_receiver_takes_worker_reports_and_refuses_bad_ones(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    async with await SQLiteJobStore.open(tmp_path / "jobs.db") as store:
        app = create_app(Settings(metrics_cache_ttl=0, otlp_token="s3cret"), store)
        client = await aiohttp_client(app)
        receiver = await receiver_of(aiohttp_client, app)
        body = tracking_request("pod-a:1", dropped_writes=4, buffered_writes=10_000).SerializeToString()
        denied = await receiver.post("/v1/metrics", data=body, headers=PROTOBUF)
        assert denied.status == 401
        auth = {**PROTOBUF, "Authorization": "Bearer s3cret"}
        assert (await receiver.post("/v1/metrics", data=b"\xff\x00garbage", headers=auth)).status == 400
        assert (await receiver.post("/v1/metrics", data=body, headers=auth)).status == 200
        as_json = json_format.MessageToJson(tracking_request("pod-b:1", store_failures=2))
        headers = {"Content-Type": "application/json", "Authorization": "Bearer s3cret"}
        assert (await receiver.post("/v1/metrics", data=as_json, headers=headers)).status == 200
        text = await scrape_client(client)
    assert by_worker(text, "dropped_writes_total") == {"pod-a:1": 4, "pod-b:1": 0}
    assert by_worker(text, "buffered_writes") == {"pod-a:1": 10_000, "pod-b:1": 0}
    assert by_worker(text, "store_failures_total") == {"pod-a:1": 0, "pod-b:1": 2}
    assert "http_client" not in text


async def scrape_client(client: Client) -> str:
    response = await client.get("/metrics")
    assert response.status == 200
    return await response.text()


def test_silent_workers_expire_and_the_number_of_workers_is_bounded() -> None:
    registry = CollectorRegistry()
    now = [0.0]
    health = WorkerHealth(registry, expiry=60, max_workers=2, clock=lambda: now[0])
    assert health.report("a", {"dropped_writes": 1})
    now[0] = 30
    assert health.report("b", {"dropped_writes": float("nan"), "replayed_writes": 3})
    now[0] = 40
    assert not health.report("c", {"dropped_writes": 1})
    assert registry.get_sample_value(PREFIX + "dropped_writes_total", {"worker": "a"}) == 1
    # A NaN is not kept: b's dropped writes stay at 0.
    assert registry.get_sample_value(PREFIX + "dropped_writes_total", {"worker": "b"}) == 0
    assert registry.get_sample_value(PREFIX + "replayed_writes_total", {"worker": "b"}) == 3
    # a fell silent for more than a minute: its series go, and c takes its place.
    now[0] = 61
    assert health.report("c", {"dropped_writes": 1})
    assert {labels["worker"] for labels in _worker_labels(registry)} == {"b", "c"}


def _worker_labels(registry: CollectorRegistry) -> list[dict[str, str]]:
    return [s.labels for family in registry.collect() for s in family.samples if "worker" in s.labels]
