"""The worker end to end on Cosmos DB: job and shard stores on the test server, the local queue."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from embedding_jobs.cosmos import init_db
from jobs import telemetry as attr
from jobs.cosmos_store import CosmosJobStore
from jobs.errors import JobNotFoundError
from jobs.model import Job, JobStatus
from jobs.store import empty_stats
from tests.components import wait_until
from tests.conftest import CosmosDatabase
from tests.pipeline import FaultyEmbedder
from worker.consumer import Consumer, ConsumerConfig
from worker.cosmos_feed import CosmosShardFeed
from worker.cosmos_shards import CosmosShardStore
from worker.feeder import Feeder
from worker.local_queue import LocalQueue
from worker.producer import Producer, ingest_shard, job_id_for
from worker.shards import Shard
from worker.tracing import get_tracer
from worker.tracker import JobTracker

S = JobStatus
TEXT = "Embedding pipelines turn text into vectors.\n\nEach shard is chunked, embedded and saved."


@dataclass
class CosmosPipeline:
    """The worker wired to Cosmos DB stores; `observer` reads the same records without adding to `store`'s costs."""

    store: CosmosJobStore
    observer: CosmosJobStore
    shards: CosmosShardStore
    queue: LocalQueue
    producer: Producer
    consumer: Consumer
    embedder: FaultyEmbedder
    spans: InMemorySpanExporter
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def ingest(self, shard_id: str, text: str) -> str:
        shard = Shard(tenant_id="tenant-a", id=shard_id, shard_type_id="document", text=text)
        assert await ingest_shard(self.shards, self.producer, shard)
        return job_id_for(shard)

    async def wait_until(self, condition: Callable[[], Awaitable[bool]], what: str, within: float = 15.0) -> None:
        await wait_until(condition, what, within)

    async def wait_for_status(self, job_id: str, status: JobStatus) -> Job:
        async def reached() -> bool:
            try:
                return (await self.observer.get("tenant-a", job_id)).status is status
            except JobNotFoundError:
                return False

        await self.wait_until(reached, f"job {job_id} to be {status.value}")
        return await self.observer.get("tenant-a", job_id)

    async def wait_idle(self) -> None:
        async def idle() -> bool:
            depth = await self.queue.depth()
            return depth.active == 0 and depth.scheduled == 0 and self.consumer.in_flight == 0

        await self.wait_until(idle, "the queue to drain")

    def outcomes(self) -> list[object]:
        spans: list[ReadableSpan] = [s for s in self.spans.get_finished_spans() if s.name == attr.JOB_SPAN]
        return [(s.attributes or {}).get(attr.OUTCOME) for s in spans]


@pytest.fixture
async def pipeline(cosmos_db: CosmosDatabase, tmp_path: Path) -> AsyncIterator[CosmosPipeline]:
    client, name = cosmos_db.client, cosmos_db.name
    await init_db(client, name, "embedding-jobs", "shards", "leases", retention=None)
    async with AsyncExitStack() as stack:
        store = await CosmosJobStore.open(client=client, database=name)
        observer = await CosmosJobStore.open(client=client, database=name)
        shards = await CosmosShardStore.open(client=client, database=name)
        queue = await LocalQueue(tmp_path / "queue.db", lock_duration=5.0, max_delivery_count=5).open()
        stack.push_async_callback(queue.close)
        spans = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(spans))
        stack.callback(provider.shutdown)
        tracer = get_tracer(provider)
        tracker = JobTracker(store, retry_initial=0.02, retry_max=0.1)
        await stack.enter_async_context(tracker.running())
        embedder = FaultyEmbedder()
        consumer = Consumer(
            queue=queue,
            tracker=tracker,
            shards=shards,
            embedder=embedder,
            tracer=tracer,
            config=ConsumerConfig(concurrency=4, max_attempts=3, backoff_base=0.05, backoff_max=0.2, receive_wait=0.1),
            rng=random.Random(1),
        )
        p = CosmosPipeline(store, observer, shards, queue, Producer(store, queue, tracer), consumer, embedder, spans)
        task = asyncio.create_task(consumer.run(p.stop))
        try:
            yield p
        finally:
            p.stop.set()
            embedder.release.set()
            await task


async def test_ingested_shard_is_embedded_and_completed_in_three_store_round_trips(pipeline: CosmosPipeline) -> None:
    await pipeline.store.create(Job.new(job_id="warm-up", tenant_id="tenant-a", shard_id="s", shard_type_id="d"))
    before = pipeline.store.round_trips

    job_id = await pipeline.ingest("shard-1", TEXT)
    done = await pipeline.wait_for_status(job_id, S.COMPLETED)
    await pipeline.wait_idle()

    # Pending record, -> processing, -> completed: one transactional batch each.
    assert pipeline.store.round_trips - before == 3
    vectors = await pipeline.shards.get_vectors("tenant-a", "shard-1")
    assert vectors is not None
    assert done.metadata.vector_count == len(vectors.vectors) >= 1
    assert (done.retry_count, done.error) == (0, None)
    assert await pipeline.observer.stats("tenant-a") == {**empty_stats(), S.PENDING: 1, S.COMPLETED: 1}
    assert pipeline.outcomes() == ["completed"]


async def test_transient_failure_is_retried_and_then_completes(pipeline: CosmosPipeline) -> None:
    job_id = await pipeline.ingest("flaky", "FAIL_ONCE " + TEXT)
    done = await pipeline.wait_for_status(job_id, S.COMPLETED)
    await pipeline.wait_idle()
    assert (done.retry_count, done.error) == (1, None)
    assert pipeline.outcomes() == ["failed", "completed"]
    assert await pipeline.observer.stats("tenant-a") == {**empty_stats(), S.COMPLETED: 1}


async def test_persistent_failure_is_dead_lettered_after_max_attempts(pipeline: CosmosPipeline) -> None:
    job_id = await pipeline.ingest("broken", "FAIL_ALWAYS " + TEXT)
    dead = await pipeline.wait_for_status(job_id, S.DEAD_LETTERED)
    await pipeline.wait_idle()
    assert dead.retry_count == 2
    assert dead.error is not None
    assert "503" in dead.error
    assert [m.reason for m in await pipeline.queue.peek_dead_letters()] == ["MaxAttemptsExceeded"]
    assert pipeline.outcomes() == ["failed", "failed", "dead_lettered"]
    assert await pipeline.observer.stats("tenant-a") == {**empty_stats(), S.DEAD_LETTERED: 1}
    assert await pipeline.observer.recount("tenant-a") == {"tenant-a": {**empty_stats(), S.DEAD_LETTERED: 1}}


async def test_a_shard_written_to_cosmos_is_fed_and_embedded(
    pipeline: CosmosPipeline, cosmos_db: CosmosDatabase
) -> None:
    shard = Shard(tenant_id="tenant-a", id="fed", shard_type_id="document", text=TEXT)
    await pipeline.shards.put(shard)
    feed = await CosmosShardFeed.open(client=cosmos_db.client, database=cosmos_db.name)
    try:
        assert (await Feeder(feed, pipeline.producer).poll()).enqueued == 1
        await pipeline.wait_for_status(job_id_for(shard), S.COMPLETED)
        await pipeline.wait_idle()
        # The vectors the worker saved are in the same container, and make no new job.
        assert (await Feeder(feed, pipeline.producer).poll()).enqueued == 0
    finally:
        await feed.close()
