"""What each job lifecycle costs on Cosmos DB, counted in requests by the test server.

Every path runs the real producer (pending record, message on a local queue) and the
worker's tracker (begin, finish) against the Cosmos job store, in a tenant of its own,
and the server counts the requests the database received. A path that costs more than
its figure here fails, as does one whose counters differ from a recount afterwards.
docs/performance.md ("Cosmos round trips") explains the figures above three.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider

from jobs.cosmos_store import CosmosJobStore
from jobs.model import JobMetadata, JobStatus
from tests.conftest import CosmosDatabase
from tests.cosmos_server import RequestCounts
from worker.local_queue import LocalQueue
from worker.messages import JobMessage
from worker.producer import Producer
from worker.tracing import get_tracer
from worker.tracker import Begin, JobTracker

S = JobStatus
METADATA = JobMetadata(embedding_model="hashing", vector_count=2, processing_time_ms=5, chunk_count=2)


@dataclass
class Rig:
    """The producer and the tracker on one Cosmos job store, and the server's count of its requests."""

    db: CosmosDatabase
    store: CosmosJobStore
    producer: Producer
    tracker: JobTracker

    def requests(self) -> RequestCounts:
        return self.db.server.requests(self.db.name)

    async def enqueue(self, msg: JobMessage) -> None:
        await self.producer.enqueue(msg)

    async def attempt(self, msg: JobMessage, outcome: JobStatus, expect: Begin = Begin.PROCEED) -> None:
        """One delivery of msg: begin, then (when it proceeds) record outcome."""
        assert await self.tracker.begin(msg, trace_id=None) is expect
        if expect is not Begin.PROCEED:
            return
        if outcome is S.COMPLETED:
            await self.tracker.finish(msg, outcome, metadata=METADATA)
        elif outcome is S.FAILED:
            await self.tracker.finish(msg, outcome, error="embedder answered 503", retry_count=msg.attempt + 1)
        elif outcome is S.DEAD_LETTERED:
            await self.tracker.finish(msg, outcome, error="embedder answered 503", retry_count=msg.attempt)


@pytest.fixture
async def rig(cosmos_db: CosmosDatabase, tmp_path: Path) -> AsyncIterator[Rig]:
    async with AsyncExitStack() as stack:
        store = await CosmosJobStore.open(client=cosmos_db.client, database=cosmos_db.name, create_if_missing=True)
        stack.push_async_callback(store.close)
        queue = await LocalQueue(tmp_path / "queue.db").open()
        stack.push_async_callback(queue.close)
        provider = TracerProvider()
        stack.callback(provider.shutdown)
        tracker = JobTracker(store)
        await stack.enter_async_context(tracker.running())
        rig = Rig(cosmos_db, store, Producer(store, queue, get_tracer(provider)), tracker)
        yield rig


def message(tenant: str) -> JobMessage:
    return JobMessage(job_id="job-1", tenant_id=tenant, shard_id="shard-1", shard_type_id="document")


async def known_tenant(rig: Rig, tenant: str) -> None:
    """Give tenant an earlier job, so the path measured is not the tenant's first."""
    await rig.enqueue(JobMessage("earlier", tenant, "shard-0", "document"))


async def completed(rig: Rig, msg: JobMessage) -> None:
    await rig.enqueue(msg)
    await rig.attempt(msg, S.COMPLETED)


async def no_producer_record(rig: Rig, msg: JobMessage) -> None:
    await rig.attempt(msg, S.COMPLETED)


async def duplicate_delivery(rig: Rig, msg: JobMessage) -> None:
    await completed(rig, msg)
    await rig.attempt(msg, S.COMPLETED, expect=Begin.SKIP)


async def redelivered_after_a_crash(rig: Rig, msg: JobMessage) -> None:
    await rig.enqueue(msg)
    assert await rig.tracker.begin(msg, trace_id=None) is Begin.PROCEED
    # The worker died mid-job; the message comes back once its lock expires.
    await rig.attempt(msg, S.COMPLETED)


async def failed_then_retried(rig: Rig, msg: JobMessage) -> None:
    await rig.enqueue(msg)
    await rig.attempt(msg, S.FAILED)
    await rig.attempt(msg.retry(), S.COMPLETED)


async def dead_lettered(rig: Rig, msg: JobMessage) -> None:
    await rig.enqueue(msg)
    await rig.attempt(msg, S.FAILED)
    await rig.attempt(msg.retry(), S.FAILED)
    await rig.attempt(msg.retry().retry(), S.DEAD_LETTERED)


async def dead_lettered_then_redelivered(rig: Rig, msg: JobMessage) -> None:
    await rig.enqueue(msg)
    await rig.attempt(msg, S.DEAD_LETTERED)
    # Killed between recording the job and dead-lettering the message.
    await rig.attempt(msg, S.COMPLETED, expect=Begin.DEAD_LETTERED)


@dataclass(frozen=True)
class Path_:
    name: str
    run: Callable[[Rig, JobMessage], Awaitable[None]]
    first_of_tenant: bool
    round_trips: int
    final: JobStatus


PATHS = [
    Path_("lifecycle", completed, False, 3, S.COMPLETED),
    # A tenant's first create meets no counter document and is sent again creating it: once per tenant, ever.
    Path_("tenant's first job", completed, True, 4, S.COMPLETED),
    Path_("no producer record", no_producer_record, False, 3, S.COMPLETED),
    Path_("no producer record, tenant's first job", no_producer_record, True, 4, S.COMPLETED),
    Path_("duplicate delivery of a completed job", duplicate_delivery, False, 5, S.COMPLETED),
    Path_("redelivered after a crash mid-job", redelivered_after_a_crash, False, 6, S.COMPLETED),
    Path_("failed attempt, then a retry that completes", failed_then_retried, False, 5, S.COMPLETED),
    Path_("dead-lettered after three attempts", dead_lettered, False, 7, S.DEAD_LETTERED),
    Path_("dead-lettered job delivered again", dead_lettered_then_redelivered, False, 5, S.DEAD_LETTERED),
]


@pytest.mark.parametrize("path", PATHS, ids=[p.name for p in PATHS])
async def test_each_job_lifecycle_costs_its_round_trips_and_keeps_counters_exact(rig: Rig, path: Path_) -> None:
    tenant = "tenant-" + path.name.replace(" ", "-").replace(",", "").replace("'", "")
    if not path.first_of_tenant:
        await known_tenant(rig, tenant)
    msg = message(tenant)
    before = rig.requests()

    await path.run(rig, msg)

    cost = rig.requests() - before
    assert cost.total == path.round_trips, f"{path.name}: {cost.total} requests ({cost.kinds})"
    assert rig.tracker.buffered == rig.tracker.store_failures == rig.tracker.dropped_writes == 0
    assert (await rig.store.get(tenant, msg.job_id)).status is path.final
    stats = await rig.store.stats(tenant)
    assert stats[path.final] == 1
    assert await rig.store.recount(tenant) == {tenant: stats}

