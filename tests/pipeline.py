"""A local pipeline for worker tests: real SQLite store, shard store and queue, real spans."""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from azure.servicebus.aio import ServiceBusClient
from azure.servicebus.aio.management import ServiceBusAdministrationClient
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from jobs.errors import JobNotFoundError, StoreUnavailableError
from jobs.model import Job, JobStatus
from jobs.sqlite_store import SQLiteJobStore
from jobs.store import JobStore
from jobs.telemetry import JOB_SPAN
from tests.components import wait_until
from tests.servicebus_peer import ServiceBusPeer
from worker.consumer import Consumer, ConsumerConfig
from worker.embedders.hashing import HashingEmbedder
from worker.errors import PermanentError, RetryableError
from worker.local_queue import LocalQueue
from worker.producer import Producer, ingest_shard
from worker.queue import Queue, QueueDepth
from worker.servicebus_queue import ServiceBusQueue
from worker.shards import Shard, SQLiteShardStore
from worker.tracing import get_tracer
from worker.tracker import JobTracker


class FaultyEmbedder:
    """The hashing embedder with faults chosen by markers in the text.

    FAIL_ONCE fails the first call with a retryable error; FAIL_ALWAYS always does;
    REJECT fails permanently; HOLD waits until `release` is set.
    """

    def __init__(self) -> None:
        self.inner = HashingEmbedder(dimensions=32)
        self.calls: list[str] = []
        self.release = asyncio.Event()
        self.holding = asyncio.Event()
        self._failed_once: set[str] = set()

    @property
    def model(self) -> str:
        return self.inner.model

    @property
    def max_input_tokens(self) -> int | None:
        return 64

    @property
    def max_batch_size(self) -> int:
        return 8

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        joined = " ".join(texts)
        self.calls.append(joined)
        if "FAIL_ALWAYS" in joined:
            raise RetryableError("embedder answered 503")
        if "FAIL_ONCE" in joined and joined not in self._failed_once:
            self._failed_once.add(joined)
            raise RetryableError("embedder answered 429", retry_after=0.01)
        if "REJECT" in joined:
            raise PermanentError("embedder answered 400: input rejected")
        if "HOLD" in joined:
            self.holding.set()
            await self.release.wait()
        return await self.inner.embed(texts)

    async def close(self) -> None:
        await self.inner.close()


class OutageStore:
    """A real job store whose calls fail with StoreUnavailableError while `down` is set."""

    def __init__(self, inner: JobStore) -> None:
        self.inner = inner
        self.down = False

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if not callable(attribute):
            return attribute

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise StoreUnavailableError("injected outage")
            return await attribute(*args, **kwargs)

        return call


@dataclass
class Pipeline:
    """Everything a worker test touches."""

    store: SQLiteJobStore
    outage: OutageStore
    shards: SQLiteShardStore
    queue: Queue
    tracker: JobTracker
    consumer: Consumer
    producer: Producer
    embedder: FaultyEmbedder
    spans: InMemorySpanExporter
    depth: Callable[[], Awaitable[QueueDepth]]
    expire_locks: Callable[[], Awaitable[None]]
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    async def ingest(self, tenant: str, shard_id: str, text: str) -> Job:
        shard = Shard(tenant_id=tenant, id=shard_id, shard_type_id="document", text=text)
        await ingest_shard(self.shards, self.producer, shard)
        page = await self.store.list(tenant, limit=500)
        return next(job for job in page.items if job.shard_id == shard_id)

    def start(self) -> None:
        self.task = asyncio.create_task(self.consumer.run(self.stop))

    async def wait_until(self, condition: Callable[[], Awaitable[bool]], what: str, within: float = 15.0) -> None:
        await wait_until(condition, what, within)

    async def wait_for_status(self, tenant: str, job_id: str, status: JobStatus) -> Job:
        async def reached() -> bool:
            try:
                return (await self.store.get(tenant, job_id)).status is status
            except JobNotFoundError:
                return False

        await self.wait_until(reached, f"job {job_id} to be {status.value}")
        return await self.store.get(tenant, job_id)

    async def wait_idle(self) -> None:
        async def idle() -> bool:
            depth = await self.depth()
            return depth.active == 0 and depth.scheduled == 0 and self.consumer.in_flight == 0

        await self.wait_until(idle, "the queue to drain")

    def job_spans(self) -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if s.name == JOB_SPAN]


QUEUE_KINDS = ["local", "servicebus"]


@asynccontextmanager
async def _local_queue(db: Path, lock_duration: float) -> AsyncIterator[tuple[Queue, Any, Any]]:
    queue = await LocalQueue(db, lock_duration=lock_duration, max_delivery_count=5).open()

    async def expire() -> None:
        # Every current lock runs out now, as if the worker had stalled past its lock duration.
        def run() -> None:
            with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
                conn.execute("UPDATE queue_messages SET visible_at = 0 WHERE lock_token IS NOT NULL")

        await asyncio.to_thread(run)

    try:
        yield queue, queue.depth, expire
    finally:
        await queue.close()


@asynccontextmanager
async def _servicebus_queue(peer: ServiceBusPeer, lock_duration: float) -> AsyncIterator[tuple[Queue, Any, Any]]:
    name = f"q-{uuid.uuid4().hex[:12]}"
    peer.create_queue(name, lock_duration=lock_duration, max_delivery_count=5)
    client = ServiceBusClient.from_connection_string(peer.connection_string, retry_backoff_factor=0.01)
    admin = ServiceBusAdministrationClient.from_connection_string(
        peer.admin_connection_string, connection_verify=str(peer.certificate_path)
    )
    queue = await ServiceBusQueue(client, name, admin=admin).open()

    async def expire() -> None:
        peer.expire_locks(name)

    try:
        yield queue, queue.depth, expire
    finally:
        await queue.close()


@asynccontextmanager
async def pipeline(
    tmp_path: Path,
    *,
    config: ConsumerConfig | None = None,
    lock_duration: float = 5.0,
    queue_kind: str = "local",
    peer: ServiceBusPeer | None = None,
    processors: Sequence[SpanProcessor] = (),
) -> AsyncIterator[Pipeline]:
    """A pipeline on a fresh SQLite file and the chosen queue; everything is stopped and closed on exit."""
    db = tmp_path / "pipeline.db"
    store = await SQLiteJobStore.open(db)
    shards = await SQLiteShardStore.open(db)
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    for processor in processors:
        provider.add_span_processor(processor)
    tracer = get_tracer(provider)
    outage = OutageStore(store)
    tracker = JobTracker(outage, retry_initial=0.02, retry_max=0.1)
    embedder = FaultyEmbedder()
    if queue_kind == "servicebus":
        assert peer is not None, "the servicebus pipeline needs the servicebus_peer fixture"
        opened = _servicebus_queue(peer, lock_duration)
    else:
        opened = _local_queue(db, lock_duration)
    try:
        async with opened as (queue, depth, expire):
            consumer = Consumer(
                queue=queue,
                tracker=tracker,
                shards=shards,
                embedder=embedder,
                tracer=tracer,
                config=config
                or ConsumerConfig(concurrency=4, max_attempts=3, backoff_base=0.05, backoff_max=0.2, receive_wait=0.1),
                rng=random.Random(1),
            )
            p = Pipeline(
                store=store,
                outage=outage,
                shards=shards,
                queue=queue,
                tracker=tracker,
                consumer=consumer,
                producer=Producer(store, queue, tracer),
                embedder=embedder,
                spans=spans,
                depth=depth,
                expire_locks=expire,
            )
            async with tracker.running():
                try:
                    yield p
                finally:
                    p.stop.set()
                    p.embedder.release.set()
                    if p.task is not None:
                        await p.task
    finally:
        await shards.close()
        await store.close()
        provider.shutdown()
