"""The worker end to end on the local pipeline: success, retries, dead-letters, bad input, outages."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.trace import SpanKind

from jobs import telemetry as attr
from jobs.model import JobStatus
from jobs.store import empty_stats
from tests.pipeline import QUEUE_KINDS, Pipeline
from tests.pipeline import pipeline as local_pipeline
from worker.chunking import estimate_tokens
from worker.consumer import ConsumerConfig, backoff_delay
from worker.messages import JobMessage
from worker.shards import Shard

S = JobStatus
PipelineFactory = Callable[..., AbstractAsyncContextManager[Pipeline]]


@pytest.fixture(params=QUEUE_KINDS)
def pipeline(request: pytest.FixtureRequest) -> PipelineFactory:
    """Builds pipelines on each queue: the local queue and Service Bus (through its test peer)."""
    kind = request.param
    peer = request.getfixturevalue("servicebus_peer") if kind == "servicebus" else None

    def make(tmp_path: Path, **kwargs: Any) -> AbstractAsyncContextManager[Pipeline]:
        return local_pipeline(tmp_path, queue_kind=kind, peer=peer, **kwargs)

    return make


TEXT = "Embedding pipelines turn text into vectors.\n\nEach shard is chunked, embedded and saved."


async def test_ingested_shard_is_embedded_and_its_job_completed_with_metadata(
    pipeline: PipelineFactory, tmp_path: Path
) -> None:
    async with pipeline(tmp_path) as p:
        job = await p.ingest("tenant-a", "shard-1", TEXT)
        assert job.status is S.PENDING
        p.start()
        done = await p.wait_for_status("tenant-a", job.id, S.COMPLETED)
        vectors = await p.shards.get_vectors("tenant-a", "shard-1")
        assert vectors is not None
        assert done.metadata.embedding_model == "hashing-32"
        assert done.metadata.vector_count == len(vectors.vectors) == done.metadata.chunk_count
        assert len(vectors.vectors) >= 1
        assert done.metadata.processing_time_ms is not None
        assert done.metadata.processing_time_ms > 0
        assert done.retry_count == 0
        assert done.error is None
        assert await p.store.stats("tenant-a") == {**empty_stats(), S.COMPLETED: 1}
        await p.wait_idle()
        assert (await p.depth()).active == 0


async def test_job_span_continues_the_producer_trace_and_records_the_attempt(
    pipeline: PipelineFactory, tmp_path: Path
) -> None:
    async with pipeline(tmp_path) as p:
        job = await p.ingest("tenant-a", "shard-1", TEXT)
        p.start()
        done = await p.wait_for_status("tenant-a", job.id, S.COMPLETED)
        await p.wait_idle()
    spans = p.spans.get_finished_spans()
    producer = next(s for s in spans if s.name == attr.ENQUEUE_SPAN)
    consumer = next(s for s in spans if s.name == attr.JOB_SPAN)
    assert producer.kind is SpanKind.PRODUCER
    assert consumer.kind is SpanKind.CONSUMER
    assert consumer.context is not None
    assert producer.context is not None
    assert consumer.context.trace_id == producer.context.trace_id
    assert consumer.parent is not None
    assert consumer.parent.span_id == producer.context.span_id
    assert done.trace_id == format(consumer.context.trace_id, "032x")
    attrs = consumer.attributes or {}
    assert attrs[attr.TENANT] == "tenant-a"
    assert attrs[attr.JOB_ID] == job.id
    assert attrs[attr.SHARD_ID] == "shard-1"
    assert attrs[attr.OUTCOME] == "completed"
    assert attrs[attr.VECTOR_COUNT] == done.metadata.vector_count
    assert attrs[attr.MESSAGING_DELIVERY_COUNT] == 1
    assert attrs[attr.GEN_AI_MODEL] == "hashing-32"
    assert float(str(attrs[attr.QUEUE_WAIT])) >= 0
    children = {s.name for s in spans if s.parent is not None and s.parent.span_id == consumer.context.span_id}
    # On the local path the shard is read with the message, and the vectors are saved in the same
    # transaction that records the job completed.
    assert {"embedding.embed", "embedding.store.complete"} <= children


async def test_transient_failure_is_retried_and_then_completes(pipeline: PipelineFactory, tmp_path: Path) -> None:
    async with pipeline(tmp_path) as p:
        job = await p.ingest("tenant-a", "flaky", "FAIL_ONCE " + TEXT)
        p.start()
        done = await p.wait_for_status("tenant-a", job.id, S.COMPLETED)
        await p.wait_idle()
        assert done.retry_count == 1
        assert done.error is None
        outcomes = [(s.attributes or {}).get(attr.OUTCOME) for s in p.job_spans()]
        assert outcomes == ["failed", "completed"]
        assert await p.store.stats("tenant-a") == {**empty_stats(), S.COMPLETED: 1}


async def test_persistent_failure_is_dead_lettered_after_max_attempts(
    pipeline: PipelineFactory, tmp_path: Path
) -> None:
    async with pipeline(tmp_path) as p:
        job = await p.ingest("tenant-a", "broken", "FAIL_ALWAYS " + TEXT)
        p.start()
        dead = await p.wait_for_status("tenant-a", job.id, S.DEAD_LETTERED)
        await p.wait_idle()
        assert dead.retry_count == 2
        assert dead.error is not None
        assert "503" in dead.error
        letters = await p.queue.peek_dead_letters()
        assert [m.reason for m in letters] == ["MaxAttemptsExceeded"]
        assert "503" in letters[0].description
        assert len(p.embedder.calls) == 3
        assert [(s.attributes or {}).get(attr.OUTCOME) for s in p.job_spans()] == [
            "failed",
            "failed",
            "dead_lettered",
        ]
        assert await p.store.stats("tenant-a") == {**empty_stats(), S.DEAD_LETTERED: 1}


async def test_permanent_failure_skips_retries(pipeline: PipelineFactory, tmp_path: Path) -> None:
    async with pipeline(tmp_path) as p:
        job = await p.ingest("tenant-a", "rejected", "REJECT " + TEXT)
        p.start()
        dead = await p.wait_for_status("tenant-a", job.id, S.DEAD_LETTERED)
        await p.wait_idle()
        assert dead.retry_count == 0
        assert [m.reason for m in await p.queue.peek_dead_letters()] == ["PermanentFailure"]
        assert len(p.embedder.calls) == 1


async def test_missing_shard_is_a_permanent_failure(pipeline: PipelineFactory, tmp_path: Path) -> None:
    async with pipeline(tmp_path) as p:
        await p.producer.enqueue(JobMessage("job-x", "tenant-a", "no-such-shard", "document"))
        p.start()
        dead = await p.wait_for_status("tenant-a", "job-x", S.DEAD_LETTERED)
        assert dead.error is not None
        assert "no-such-shard" in dead.error
        assert p.embedder.calls == []


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        (b"\xff\xfe not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"jobId": "j1", "tenantId": "t"}', "missing field(s): shardId, shardTypeId"),
        (b'{"jobId": "j1", "tenantId": "bad tenant", "shardId": "s", "shardTypeId": "d"}', "tenant id"),
        (b'{"jobId": 7, "tenantId": "t", "shardId": "s", "shardTypeId": "d"}', "jobId"),
        (b'{"jobId": "j", "tenantId": "t", "shardId": "s", "shardTypeId": "d", "attempt": -1}', "attempt"),
    ],
)
async def test_malformed_message_is_dead_lettered_with_a_reason_and_creates_no_job(
    pipeline: PipelineFactory, tmp_path: Path, body: bytes, complaint: str
) -> None:
    async with pipeline(tmp_path) as p:
        await p.queue.send(body, message_id="bad-1")
        p.start()

        async def dead_lettered() -> bool:
            return (await p.depth()).dead_letter == 1

        await p.wait_until(dead_lettered, "the malformed message to be dead-lettered")
        [letter] = await p.queue.peek_dead_letters()
        assert letter.reason == "MalformedMessage"
        assert complaint in letter.description
        assert await p.store.stats_all() == {}
        [span] = p.job_spans()
        assert (span.attributes or {})[attr.OUTCOME] == "dead_lettered"


async def test_duplicate_delivery_creates_one_job_counted_once(pipeline: PipelineFactory, tmp_path: Path) -> None:
    async with pipeline(tmp_path) as p:
        job = await p.ingest("tenant-a", "shard-1", TEXT)
        p.start()
        await p.wait_for_status("tenant-a", job.id, S.COMPLETED)
        # The producer sends the same job again (for example after a timeout it could not see through).
        message = JobMessage(job.id, "tenant-a", "shard-1", "document")
        await p.queue.send(message.to_body(), message_id=message.message_id)

        async def two_spans() -> bool:
            return len(p.job_spans()) == 2

        await p.wait_until(two_spans, "the duplicate to be handled")
        await p.wait_idle()
        assert [(s.attributes or {}).get(attr.OUTCOME) for s in p.job_spans()] == ["completed", "skipped"]
        assert await p.store.stats("tenant-a") == {**empty_stats(), S.COMPLETED: 1}
        assert len(p.embedder.calls) == 1


async def test_message_without_a_pending_record_creates_the_job(pipeline: PipelineFactory, tmp_path: Path) -> None:
    async with pipeline(tmp_path) as p:
        await p.shards.put(Shard(tenant_id="tenant-a", id="shard-1", shard_type_id="document", text=TEXT))
        message = JobMessage("job-direct", "tenant-a", "shard-1", "document")
        await p.queue.send(message.to_body(), message_id=message.message_id)
        p.start()
        done = await p.wait_for_status("tenant-a", "job-direct", S.COMPLETED)
        assert done.shard_id == "shard-1"
        assert await p.store.stats("tenant-a") == {**empty_stats(), S.COMPLETED: 1}


async def test_store_outage_never_blocks_embedding_and_records_converge(tmp_path: Path) -> None:
    async with local_pipeline(tmp_path) as p:
        jobs = [await p.ingest("tenant-a", f"shard-{n}", f"{TEXT} {n}") for n in range(5)]
        p.outage.down = True
        p.start()
        await p.wait_idle()
        # Every shard was embedded and every message settled while the store was down.
        for n in range(5):
            assert await p.shards.get_vectors("tenant-a", f"shard-{n}") is not None
        assert (await p.depth()).active == 0
        assert p.tracker.buffered == 10
        # Once the store is known to be down, writes join the buffer without trying it each.
        assert p.tracker.store_failures >= 1
        assert await p.store.stats("tenant-a") == {**empty_stats(), S.PENDING: 5}
        p.outage.down = False

        async def converged() -> bool:
            return p.tracker.buffered == 0

        await p.wait_until(converged, "buffered writes to replay")
        for job in jobs:
            done = await p.store.get("tenant-a", job.id)
            assert done.status is S.COMPLETED
            assert done.metadata.vector_count
        assert await p.store.stats("tenant-a") == {**empty_stats(), S.COMPLETED: 5}
        assert await p.store.recount("tenant-a") == {"tenant-a": {**empty_stats(), S.COMPLETED: 5}}


async def test_full_tracking_buffer_counts_dropped_writes(tmp_path: Path) -> None:
    async with local_pipeline(tmp_path) as p:
        p.tracker._buffer_size = 3
        for n in range(3):
            await p.ingest("tenant-a", f"shard-{n}", f"{TEXT} {n}")
        p.outage.down = True
        p.start()
        await p.wait_idle()
        assert p.tracker.buffered == 3
        assert p.tracker.dropped_writes == 3


async def test_shutdown_lets_in_flight_jobs_finish_within_the_drain_timeout(
    pipeline: PipelineFactory, tmp_path: Path
) -> None:
    config = ConsumerConfig(concurrency=2, max_attempts=3, backoff_base=0.05, drain_timeout=10.0, receive_wait=0.1)
    async with pipeline(tmp_path, config=config) as p:
        job = await p.ingest("tenant-a", "slow", "HOLD " + TEXT)
        p.start()
        await asyncio.wait_for(p.embedder.holding.wait(), 10)
        p.stop.set()
        p.embedder.release.set()
        assert p.task is not None
        await p.task
        assert (await p.store.get("tenant-a", job.id)).status is S.COMPLETED
        assert (await p.depth()).active == 0


async def test_shutdown_abandons_jobs_past_the_drain_timeout_and_they_resume_later(
    pipeline: PipelineFactory, tmp_path: Path
) -> None:
    config = ConsumerConfig(concurrency=2, max_attempts=3, backoff_base=0.05, drain_timeout=0.1, receive_wait=0.1)
    async with pipeline(tmp_path, config=config) as p:
        job = await p.ingest("tenant-a", "slow", "HOLD " + TEXT)
        p.start()
        await asyncio.wait_for(p.embedder.holding.wait(), 10)
        p.stop.set()
        assert p.task is not None
        await p.task
        # Abandoned, not lost: the message is visible again and the job waits in processing.
        assert (await p.store.get("tenant-a", job.id)).status is S.PROCESSING
        redelivered = await p.queue.receive(max_messages=1, max_wait=5)
        assert len(redelivered) == 1
        assert redelivered[0].delivery_count == 2
        await p.queue.abandon(redelivered[0])
        # A restarted worker finishes it.
        p.embedder.release.set()
        p.stop.clear()
        p.start()
        done = await p.wait_for_status("tenant-a", job.id, S.COMPLETED)
        assert done.status is S.COMPLETED
        assert await p.store.stats("tenant-a") == {**empty_stats(), S.COMPLETED: 1}


async def test_lock_is_renewed_while_a_long_job_runs(pipeline: PipelineFactory, tmp_path: Path) -> None:
    async with pipeline(tmp_path, lock_duration=1.0) as p:
        job = await p.ingest("tenant-a", "slow", "HOLD " + TEXT)
        p.start()
        await asyncio.wait_for(p.embedder.holding.wait(), 10)
        started = datetime.now(UTC)

        async def three_lock_periods() -> bool:
            return (datetime.now(UTC) - started).total_seconds() > 3.0

        await p.wait_until(three_lock_periods, "three lock periods to pass")
        p.embedder.release.set()
        await p.wait_for_status("tenant-a", job.id, S.COMPLETED)
        await p.wait_idle()
        # Never redelivered: the lock held for three times its duration.
        assert len(p.job_spans()) == 1
        assert (p.job_spans()[0].attributes or {})[attr.MESSAGING_DELIVERY_COUNT] == 1


async def test_lost_lock_redelivers_and_the_job_is_counted_once(pipeline: PipelineFactory, tmp_path: Path) -> None:
    async with pipeline(tmp_path) as p:
        job = await p.ingest("tenant-a", "slow", "HOLD " + TEXT)
        p.start()
        await asyncio.wait_for(p.embedder.holding.wait(), 10)
        # The worker stalls past its lock: another receiver may now own the message.
        await p.expire_locks()
        p.embedder.release.set()
        await p.wait_for_status("tenant-a", job.id, S.COMPLETED)

        async def redelivered_and_settled() -> bool:
            depth = await p.depth()
            return len(p.job_spans()) == 2 and depth.active == 0 and p.consumer.in_flight == 0

        await p.wait_until(redelivered_and_settled, "the redelivered message to be settled")
        outcomes = sorted(str((s.attributes or {}).get(attr.OUTCOME)) for s in p.job_spans())
        # The redelivered copy either finds the job finished (skipped) or, arriving while the
        # stalled attempt is still finishing, embeds again; the record is written once either way.
        assert outcomes in (["completed", "skipped"], ["completed", "completed"])
        deliveries = sorted(int(str((s.attributes or {})[attr.MESSAGING_DELIVERY_COUNT])) for s in p.job_spans())
        assert deliveries == [1, 2]
        assert await p.store.stats("tenant-a") == {**empty_stats(), S.COMPLETED: 1}
        assert (await p.depth()).dead_letter == 0


def test_backoff_grows_exponentially_with_jitter_and_is_capped() -> None:
    rng = random.Random(3)
    for attempt in range(1, 12):
        ceiling = min(60.0, 2.0 * 2 ** (attempt - 1))
        delays = [backoff_delay(attempt, 2.0, 60.0, rng) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1


async def test_chunks_fit_the_models_input_limit_even_above_the_configured_budget(tmp_path: Path) -> None:
    async with local_pipeline(tmp_path) as p:
        assert p.consumer.config.chunk_max_tokens > 64
        text = " ".join(f"word{n}" for n in range(600))
        job = await p.ingest("tenant-a", "long", text)
        p.start()
        done = await p.wait_for_status("tenant-a", job.id, S.COMPLETED)
        vectors = await p.shards.get_vectors("tenant-a", "long")
        assert vectors is not None
        assert done.metadata.chunk_count == len(vectors.chunks) > 1
        assert max(estimate_tokens(chunk) for chunk in vectors.chunks) <= 64
