"""The store and the queue depth are read apart: one source failing never blanks or ages the other's gauges.

Real failures only: a stopped Service Bus peer or a closed local queue for the depth, the
Cosmos test server failing or hanging the job container for the store.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from azure.servicebus import ServiceBusMessage
from azure.servicebus.aio import ServiceBusClient
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp.plugin import AiohttpClient

from exporter.app import create_app
from exporter.state import DepthSource
from jobs.cosmos_store import DEFAULT_CONTAINER, CosmosJobStore
from jobs.model import Job
from jobs.settings import Settings
from jobs.sqlite_store import SQLiteJobStore
from jobs.store import JobStore
from tests.components import wait_until
from tests.cosmos_server import CosmosServer, cosmos_database
from tests.servicebus_peer import ServiceBusPeer
from worker.local_queue import LocalQueue
from worker.queue import QueueDepth
from worker.servicebus_queue import ServiceBusQueue

Client = TestClient[web.Request, web.Application]
QUEUE = "embedding-jobs"
# Short intervals and timeouts keep each test to a few seconds; the logic does not depend on them.
SETTINGS = Settings(
    metrics_cache_ttl=0, refresh_interval=0.2, refresh_timeout=1.0, queue_timeout=1.0, state_role="always"
)

Series = tuple[str, dict[str, str]]
JOBS_PENDING: Series = ("embedding_jobs", {"tenant": "acme", "status": "pending"})
ACTIVE: Series = ("embedding_queue_messages", {"queue": QUEUE, "state": "active"})
STORE_ERRORS: Series = ("embedding_exporter_store_refresh_errors_total", {})
STORE_LAST: Series = ("embedding_exporter_store_last_success_timestamp_seconds", {})
DEPTH_ERRORS: Series = ("embedding_exporter_queue_depth_errors_total", {"queue": QUEUE})
DEPTH_LAST: Series = ("embedding_exporter_queue_depth_last_success_timestamp_seconds", {"queue": QUEUE})
DEPTH_READS: Series = ("embedding_exporter_queue_depth_duration_seconds_count", {"queue": QUEUE})


async def scrape(client: Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await client.get("/metrics")
    assert response.status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(await response.text())
        for s in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], series: Series) -> float:
    name, labels = series
    return samples.get((name, tuple(sorted(labels.items()))), float("nan"))


async def add_job(store: JobStore, n: int) -> None:
    await store.create(Job.new(job_id=f"job-{n}", tenant_id="acme", shard_id=f"shard-{n}", shard_type_id="doc"))


@dataclass
class DepthFault:
    """A real queue adapter as the depth source, and the way to make it fail."""

    source: DepthSource
    fail: Callable[[], Awaitable[None]]


def _as_source(depth: Callable[[], Awaitable[QueueDepth]]) -> DepthSource:
    """The adapter's depth as the exporter takes it (as the command line wires it)."""

    async def read() -> dict[str, int]:
        d = await depth()
        return {"active": d.active, "scheduled": d.scheduled, "dead_letter": d.dead_letter}

    return read


@pytest.fixture
def own_peer() -> Iterator[ServiceBusPeer]:
    """A peer of this test's own, so stopping it leaves the session's peer alone."""
    peer = ServiceBusPeer().start()
    try:
        yield peer
    finally:
        peer.stop()


@pytest.fixture(params=["servicebus-peer-stopped", "local-queue-closed"])
async def failing_depth(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[DepthFault]:
    """A queue holding three active messages whose depth reads work until fail() is awaited."""
    if request.param == "servicebus-peer-stopped":
        peer: ServiceBusPeer = request.getfixturevalue("own_peer")
        async with (
            ServiceBusClient.from_connection_string(peer.connection_string) as client,
            client.get_queue_sender(QUEUE) as sender,
        ):
            await sender.send_messages([ServiceBusMessage(f"m-{i}") for i in range(3)])
        # Not opened: depth needs only the administration client, and no AMQP link outlives the peer.
        sb_queue = ServiceBusQueue.from_connection_string(
            peer.connection_string,
            QUEUE,
            admin_endpoint=peer.management_endpoint,
            admin_connection_verify=str(peer.certificate_path),
        )

        async def stop_peer() -> None:
            peer.stop()

        try:
            yield DepthFault(_as_source(sb_queue.depth), stop_peer)
        finally:
            await sb_queue.close()
    else:
        local = await LocalQueue(tmp_path / "queue.db", QUEUE).open()
        for i in range(3):
            await local.send(b"{}", message_id=f"m-{i}")
        try:
            yield DepthFault(_as_source(local.depth), local.close)
        finally:
            await local.close()


async def test_failing_depth_reads_keep_the_state_gauges_fresh_and_count_depth_errors(
    aiohttp_client: AiohttpClient, tmp_path: Path, failing_depth: DepthFault
) -> None:
    store = await SQLiteJobStore.open(tmp_path / "jobs.db")
    try:
        await add_job(store, 1)
        client = await aiohttp_client(create_app(SETTINGS, store, depth_source=failing_depth.source))

        async def both_read() -> bool:
            samples = await scrape(client)
            return value(samples, JOBS_PENDING) == 1 and value(samples, ACTIVE) == 3

        await wait_until(both_read, "the first store and depth reads")
        depth_read_at = value(await scrape(client), DEPTH_LAST)

        await failing_depth.fail()
        failed_at = time.time()
        await add_job(store, 2)

        async def store_fresh_and_depth_failing() -> bool:
            samples = await scrape(client)
            return (
                value(samples, JOBS_PENDING) == 2
                and value(samples, STORE_LAST) > failed_at
                and value(samples, DEPTH_ERRORS) >= 2
            )

        await wait_until(store_fresh_and_depth_failing, "store reads to go on while depth reads fail")
        samples = await scrape(client)
        assert value(samples, STORE_ERRORS) == 0
        # The depth keeps its last reading, and its age shows in the last-success time.
        assert value(samples, ACTIVE) == 3
        assert value(samples, DEPTH_LAST) == depth_read_at
    finally:
        await store.close()


@pytest.fixture
async def cosmos_store(cosmos_server: CosmosServer) -> AsyncIterator[CosmosJobStore]:
    async with cosmos_database(cosmos_server) as db:
        store = await CosmosJobStore.open(client=db.client, database=db.name, create_if_missing=True)
        try:
            yield store
        finally:
            cosmos_server.set_fault(DEFAULT_CONTAINER, None)
            await store.close()


@pytest.mark.parametrize("fault", ["fail", "hang"])
async def test_a_failing_store_leaves_the_queue_depth_updating(
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
    cosmos_server: CosmosServer,
    cosmos_store: CosmosJobStore,
    fault: str,
) -> None:
    await add_job(cosmos_store, 1)
    async with LocalQueue(tmp_path / "queue.db", QUEUE) as local:
        await local.send(b"{}", message_id="m-0")
        client = await aiohttp_client(create_app(SETTINGS, cosmos_store, depth_source=_as_source(local.depth)))

        async def both_read() -> bool:
            samples = await scrape(client)
            return value(samples, JOBS_PENDING) == 1 and value(samples, ACTIVE) == 1

        await wait_until(both_read, "the first store and depth reads")
        store_read_at = value(await scrape(client), STORE_LAST)

        cosmos_server.set_fault(DEFAULT_CONTAINER, fault)
        for i in range(1, 3):
            await local.send(b"{}", message_id=f"m-{i}")

        async def depth_fresh_and_store_failing() -> bool:
            samples = await scrape(client)
            return value(samples, ACTIVE) == 3 and value(samples, STORE_ERRORS) >= 2

        await wait_until(depth_fresh_and_store_failing, "depth reads to go on while store reads fail")
        samples = await scrape(client)
        assert value(samples, DEPTH_ERRORS) == 0
        assert value(samples, JOBS_PENDING) == 1
        assert value(samples, STORE_LAST) == store_read_at
        assert value(samples, DEPTH_LAST) > value(samples, STORE_LAST)

        cosmos_server.set_fault(DEFAULT_CONTAINER, None)

        async def store_back() -> bool:
            return value(await scrape(client), STORE_LAST) > store_read_at

        await wait_until(store_back, "store reads to succeed again")


async def test_a_follower_reads_no_depth_and_exports_no_depth_metrics(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    store = await SQLiteJobStore.open(tmp_path / "jobs.db")
    try:
        async with LocalQueue(tmp_path / "queue.db", QUEUE) as local:
            settings = SETTINGS.with_changes(state_role="never")
            client = await aiohttp_client(create_app(settings, store, depth_source=_as_source(local.depth)))
            leader = await aiohttp_client(create_app(SETTINGS, store, depth_source=_as_source(local.depth)))

            async def leader_read() -> bool:
                return value(await scrape(leader), DEPTH_READS) >= 1

            await wait_until(leader_read, "the leader's first depth read")
            depth_series = {DEPTH_ERRORS[0], DEPTH_LAST[0], DEPTH_READS[0], ACTIVE[0]}
            assert depth_series <= {name for name, _ in await scrape(leader)}
            assert depth_series.isdisjoint(name for name, _ in await scrape(client))
    finally:
        await store.close()
