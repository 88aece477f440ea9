"""Batched receive: the consume loop fills its free slots in one receive call, and never holds more.

Run on both queues (the local SQLite queue and Service Bus through its test peer with the real
SDK). A RecordingQueue passes every call to the real queue and records what the loop asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from jobs import telemetry as attr
from jobs.model import Job, JobStatus
from tests.pipeline import QUEUE_KINDS, Pipeline
from tests.pipeline import pipeline as local_pipeline
from tests.servicebus_peer import ServiceBusPeer
from worker.consumer import Consumer, ConsumerConfig
from worker.queue import DeadLetteredMessage, Queue, QueueDepth, ReceivedMessage
from worker.servicebus_queue import ServiceBusQueue

S = JobStatus
PipelineFactory = Callable[..., AbstractAsyncContextManager[Pipeline]]
TEXT = "HOLD Embedding pipelines turn text into vectors.\n\nEach shard is chunked, embedded and saved."
CONCURRENCY = 4


@pytest.fixture(params=QUEUE_KINDS)
def queue_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def pipeline(request: pytest.FixtureRequest, queue_kind: str) -> PipelineFactory:
    """Builds pipelines on the queue of queue_kind."""
    peer = request.getfixturevalue("servicebus_peer") if queue_kind == "servicebus" else None

    def make(tmp_path: Path, **kwargs: Any) -> AbstractAsyncContextManager[Pipeline]:
        return local_pipeline(tmp_path, queue_kind=queue_kind, peer=peer, **kwargs)

    return make


class RecordingQueue:
    """A real queue whose receive calls, and the messages received but not settled, are recorded."""

    def __init__(self, inner: Queue) -> None:
        self.inner = inner
        self.name = inner.name
        self.consumer: Consumer | None = None
        # (max_messages asked for, messages returned, jobs in flight when asked)
        self.receives: list[tuple[int, int, int]] = []
        self.held = 0
        self.most_held = 0

    async def receive(self, max_messages: int = 1, max_wait: float = 1.0) -> Sequence[ReceivedMessage]:
        in_flight = self.consumer.in_flight if self.consumer is not None else 0
        received = await self.inner.receive(max_messages, max_wait)
        self.receives.append((max_messages, len(received), in_flight))
        self.held += len(received)
        self.most_held = max(self.most_held, self.held)
        return received

    def non_empty(self) -> list[tuple[int, int, int]]:
        return [call for call in self.receives if call[1]]

    @contextlib.asynccontextmanager
    async def _settling(self) -> AsyncIterator[None]:
        try:
            yield
        finally:
            self.held -= 1

    async def complete(self, message: ReceivedMessage) -> None:
        async with self._settling():
            await self.inner.complete(message)

    async def abandon(self, message: ReceivedMessage) -> None:
        async with self._settling():
            await self.inner.abandon(message)

    async def dead_letter(self, message: ReceivedMessage, reason: str, description: str) -> None:
        async with self._settling():
            await self.inner.dead_letter(message, reason, description)

    async def send(
        self,
        body: bytes,
        *,
        message_id: str,
        application_properties: Mapping[str, str] | None = None,
        scheduled_enqueue_time: datetime | None = None,
    ) -> int:
        return await self.inner.send(
            body,
            message_id=message_id,
            application_properties=application_properties,
            scheduled_enqueue_time=scheduled_enqueue_time,
        )

    async def renew_lock(self, message: ReceivedMessage) -> datetime:
        return await self.inner.renew_lock(message)

    async def peek_dead_letters(
        self, max_messages: int = 100, from_sequence_number: int = 0
    ) -> Sequence[DeadLetteredMessage]:
        return await self.inner.peek_dead_letters(max_messages, from_sequence_number)

    async def depth(self) -> QueueDepth:
        return await self.inner.depth()

    async def close(self) -> None:
        await self.inner.close()


def recording(p: Pipeline, config: ConsumerConfig) -> RecordingQueue:
    """Put a consumer with this config on a RecordingQueue around the pipeline's queue."""
    queue = RecordingQueue(p.queue)
    p.consumer = Consumer(
        queue=queue,
        tracker=p.tracker,
        shards=p.shards,
        embedder=p.embedder,
        tracer=p.consumer.tracer,
        config=config,
    )
    queue.consumer = p.consumer
    return queue


def locked_at_the_queue(queue_kind: str, p: Pipeline, tmp_path: Path, peer: ServiceBusPeer | None) -> int:
    """Messages the queue itself counts as locked by a receiver right now."""
    if queue_kind == "servicebus":
        assert peer is not None
        return peer.locked_count(p.queue.name)
    with contextlib.closing(sqlite3.connect(tmp_path / "pipeline.db")) as conn:
        row = conn.execute(
            "SELECT COUNT(*) FROM queue_messages WHERE lock_token IS NOT NULL AND visible_at > ?", (time.time(),)
        ).fetchone()
    return int(row[0])


def config(**overrides: Any) -> ConsumerConfig:
    values: dict[str, Any] = {
        "concurrency": CONCURRENCY,
        "max_attempts": 3,
        "backoff_base": 0.05,
        "backoff_max": 0.2,
        "receive_wait": 0.1,
        "drain_timeout": 10.0,
    }
    return ConsumerConfig(**(values | overrides))


async def ingest(p: Pipeline, count: int) -> list[Job]:
    return [await p.ingest("tenant-a", f"shard-{i}", f"{i} {TEXT}") for i in range(count)]


async def until_in_flight(p: Pipeline, count: int) -> None:
    async def reached() -> bool:
        return p.consumer.in_flight == count

    await p.wait_until(reached, f"{count} jobs in flight")


async def test_free_slots_are_filled_in_one_receive_call_and_never_exceeded(
    pipeline: PipelineFactory, queue_kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    peer = request.getfixturevalue("servicebus_peer") if queue_kind == "servicebus" else None
    async with pipeline(tmp_path, config=config()) as p:
        jobs = await ingest(p, 2 * CONCURRENCY)
        queue = recording(p, config())
        p.start()
        await until_in_flight(p, CONCURRENCY)
        # Every slot was free: one call asked for all of them and got them.
        assert queue.non_empty()[0] == (CONCURRENCY, CONCURRENCY, 0)
        # The other half waits at the queue, not locked in the worker's memory.
        assert locked_at_the_queue(queue_kind, p, tmp_path, peer) == CONCURRENCY
        assert (await p.depth()).active == 2 * CONCURRENCY

        p.embedder.release.set()
        for job in jobs:
            await p.wait_for_status("tenant-a", job.id, S.COMPLETED)
        await p.wait_idle()
        assert sum(got for _, got, _ in queue.receives) == 2 * CONCURRENCY
        assert len(queue.non_empty()) < 2 * CONCURRENCY
        # Never asked for more than the free slots, never held more than the concurrency.
        assert all(asked + in_flight <= CONCURRENCY for asked, _, in_flight in queue.receives)
        assert queue.most_held <= CONCURRENCY
        assert queue.held == 0


async def test_receive_batch_of_one_asks_for_one_message_per_call(tmp_path: Path) -> None:
    async with local_pipeline(tmp_path) as p:
        jobs = await ingest(p, CONCURRENCY)
        queue = recording(p, config(receive_batch=1))
        p.embedder.release.set()
        p.start()
        for job in jobs:
            await p.wait_for_status("tenant-a", job.id, S.COMPLETED)
        await p.wait_idle()
        assert {asked for asked, _, _ in queue.receives} == {1}
        assert len(queue.non_empty()) == CONCURRENCY


async def test_stop_with_every_slot_busy_drains_the_held_jobs_and_leaves_the_rest_unlocked(
    pipeline: PipelineFactory, queue_kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    peer = request.getfixturevalue("servicebus_peer") if queue_kind == "servicebus" else None
    async with pipeline(tmp_path, config=config()) as p:
        jobs = await ingest(p, 2 * CONCURRENCY)
        queue = recording(p, config())
        p.start()
        await until_in_flight(p, CONCURRENCY)
        p.stop.set()
        p.embedder.release.set()
        assert p.task is not None
        await p.task
        statuses = [(await p.store.get("tenant-a", job.id)).status for job in jobs]
        assert statuses.count(S.COMPLETED) == CONCURRENCY
        assert statuses.count(S.PENDING) == CONCURRENCY
        assert queue.held == 0
        assert locked_at_the_queue(queue_kind, p, tmp_path, peer) == 0
        assert (await p.depth()).active == CONCURRENCY

        # A restarted loop takes the rest, each on its first delivery: none was received before.
        p.stop.clear()
        p.start()
        for job in jobs:
            await p.wait_for_status("tenant-a", job.id, S.COMPLETED)
        await p.wait_idle()
        deliveries = [(span.attributes or {})[attr.MESSAGING_DELIVERY_COUNT] for span in p.job_spans()]
        assert deliveries == [1] * 2 * CONCURRENCY


async def test_concurrent_settlements_and_sends_on_service_bus_take_milliseconds(
    servicebus_peer: ServiceBusPeer, tmp_path: Path
) -> None:
    async with local_pipeline(tmp_path, queue_kind="servicebus", peer=servicebus_peer) as p:
        queue = p.queue
        assert isinstance(queue, ServiceBusQueue)
        rounds = []
        for round_ in range(3):
            for i in range(8):
                await queue.send(b"{}", message_id=f"r{round_}-{i}")
            received: list[ReceivedMessage] = []
            while len(received) < 8:
                received += await queue.receive(max_messages=8 - len(received), max_wait=5)
            started = time.perf_counter()
            await asyncio.gather(
                *(queue.complete(message) for message in received),
                *(queue.send(b"{}", message_id=f"s{round_}-{i}") for i in range(4)),
            )
            rounds.append(time.perf_counter() - started)
            for message in await queue.receive(max_messages=4, max_wait=5):
                await queue.complete(message)
        # Callers reading one AMQP connection at once stall for the SDK's 0.2 s socket read
        # timeout; taking turns, twelve calls take a few milliseconds. Best of three rounds.
        assert min(rounds) < 0.1, rounds
        assert servicebus_peer.active_count(queue.name) == 0


async def test_receiving_fewer_than_one_message_is_refused(servicebus_peer: ServiceBusPeer) -> None:
    with pytest.raises(ValueError, match="receive_batch"):
        ConsumerConfig(receive_batch=0)
    queue = ServiceBusQueue.from_connection_string(servicebus_peer.connection_string, "never-opened")
    try:
        with pytest.raises(ValueError, match="max_messages"):
            await queue.receive(max_messages=0)
    finally:
        await queue.close()


async def test_the_merged_local_path_locks_every_free_slot_in_one_receipt(tmp_path: Path) -> None:
    # The pipeline's own consumer: queue, job store and shards share one connection, so a
    # receipt also begins its jobs (worker/local_path.py). One receipt locks its messages in
    # one transaction, with one locked-until time.
    async with local_pipeline(tmp_path, config=config()) as p:
        jobs = await ingest(p, 2 * CONCURRENCY)
        p.start()
        await until_in_flight(p, CONCURRENCY)
        with contextlib.closing(sqlite3.connect(tmp_path / "pipeline.db")) as conn:
            locks = conn.execute(
                "SELECT COUNT(*), COUNT(DISTINCT visible_at) FROM queue_messages WHERE lock_token IS NOT NULL"
            ).fetchone()
        assert tuple(locks) == (CONCURRENCY, 1)
        p.embedder.release.set()
        for job in jobs:
            await p.wait_for_status("tenant-a", job.id, S.COMPLETED)
        await p.wait_idle()
