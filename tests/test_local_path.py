"""The local path: a job's writes on the one SQLite file commit together, or not at all."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from jobs.errors import InvalidJobError
from jobs.model import Job, JobMetadata, JobStatus
from jobs.sqlite_store import SQLiteJobStore
from jobs.store import empty_stats
from tests.components import wait_for
from worker.local_path import LocalPath
from worker.local_queue import LocalQueue
from worker.messages import JobMessage
from worker.queue import ReceivedMessage
from worker.shards import Shard, ShardVectors, SQLiteShardStore
from worker.spool import Spool
from worker.tracker import Begin, JobTracker

S = JobStatus
TENANT = "tenant-a"
TIMEOUT = 0.3
META = JobMetadata("hashing-4", vector_count=2, chunk_count=2, processing_time_ms=3.0)
TRACE = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE}-b7ad6b7169203331-01"


@dataclass
class Parts:
    db: Path
    store: SQLiteJobStore
    queue: LocalQueue
    shards: SQLiteShardStore
    tracker: JobTracker
    path: LocalPath


@contextlib.asynccontextmanager
async def parts_on(db: Path, spool: Path, lock_duration: float = 30.0) -> AsyncIterator[Parts]:
    store = await SQLiteJobStore.open(db)
    queue = await LocalQueue(db, lock_duration=lock_duration).open()
    shards = await SQLiteShardStore.open(db)
    tracker = JobTracker(store, timeout=TIMEOUT, spool=Spool.open(spool))
    try:
        path = LocalPath.of(queue, shards, tracker)
        assert path is not None
        yield Parts(db, store, queue, shards, tracker, path)
    finally:
        for part in (queue, shards, store):
            await part.close()


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[Parts]:
    async with parts_on(tmp_path / "local.db", tmp_path / "spool") as opened:
        yield opened


def message(n: int, attempt: int = 0) -> JobMessage:
    return JobMessage(f"job-{n}", TENANT, f"shard-{n}", "document", attempt)


async def produce(p: Parts, n: int, status: JobStatus | None = S.PENDING, attempt: int = 0) -> JobMessage:
    """A shard, its job record in status (None: no record), and its message."""
    msg = message(n, attempt)
    await p.shards.put(Shard(TENANT, msg.shard_id, "document", f"text of shard {n}"))
    if status is not None:
        await p.store.create(
            Job.new(job_id=msg.job_id, tenant_id=TENANT, shard_id=msg.shard_id, shard_type_id="document", status=status)
        )
    await p.queue.send(msg.to_body(), message_id=msg.message_id, application_properties={"traceparent": TRACEPARENT})
    return msg


async def receive(p: Parts, count: int) -> list[ReceivedMessage]:
    received = list(await p.path.receive(max_messages=count, max_wait=5.0))
    assert len(received) == count
    return received


def vectors_of(msg: JobMessage) -> ShardVectors:
    return ShardVectors(model="hashing-4", content_hash="h", chunks=["a", "b"], vectors=[[1.0, 0.0], [0.0, 1.0]])


async def assert_counters_match(store: SQLiteJobStore) -> None:
    stats = await store.stats(TENANT)
    assert await store.recount(TENANT) == {TENANT: stats}


@contextlib.contextmanager
def write_lock(db: Path) -> Iterator[None]:
    """Another connection holding the file's write lock: every writer waits, as in a stalled disk."""
    conn = sqlite3.connect(db, isolation_level=None, timeout=10)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()


async def test_a_local_path_needs_the_queue_jobs_and_shards_on_one_connection(tmp_path: Path) -> None:
    db = tmp_path / "local.db"
    async with (
        await LocalQueue(db).open() as queue,
        await SQLiteJobStore.open(db) as store,
        await SQLiteJobStore.open(tmp_path / "other.db") as elsewhere,
    ):
        shards = await SQLiteShardStore.open(db)
        try:
            same = JobTracker(store, spool=Spool())
            assert isinstance(LocalPath.of(queue, shards, same), LocalPath)
            assert LocalPath.of(queue, shards, JobTracker(elsewhere, spool=Spool())) is None
        finally:
            await shards.close()


async def test_receiving_begins_each_job_in_the_same_transaction(parts: Parts) -> None:
    fresh = await produce(parts, 1)
    retried = await produce(parts, 2, S.FAILED, attempt=1)
    unrecorded = await produce(parts, 3, status=None)
    completed = await produce(parts, 4, S.PENDING)
    dead = await produce(parts, 5, S.PENDING)
    for msg, final in ((completed, S.COMPLETED), (dead, S.DEAD_LETTERED)):
        await parts.store.transition(TENANT, msg.job_id, S.PENDING, S.PROCESSING)
        await parts.store.transition(TENANT, msg.job_id, S.PROCESSING, final)
    await parts.queue.send(b"{not json", message_id="garbage")

    received = await receive(parts, 6)
    taken = {m.message_id: parts.path.take(m) for m in received}
    begun = {message_id: t.begin if t is not None else None for message_id, t in taken.items()}
    assert begun == {
        fresh.message_id: Begin.PROCEED,
        retried.message_id: Begin.PROCEED,
        unrecorded.message_id: Begin.PROCEED,
        completed.message_id: Begin.SKIP,
        dead.message_id: Begin.DEAD_LETTERED,
        "garbage": None,
    }
    # The shards of the jobs to work on were read with them.
    shards = {message_id: t.shard.text if t and t.shard else None for message_id, t in taken.items()}
    assert shards == {
        fresh.message_id: "text of shard 1",
        retried.message_id: "text of shard 2",
        unrecorded.message_id: "text of shard 3",
        completed.message_id: None,
        dead.message_id: None,
        "garbage": None,
    }
    # Each answer is given once.
    assert all(parts.path.take(m) is None for m in received)
    for msg in (fresh, retried, unrecorded):
        job = await parts.store.get(TENANT, msg.job_id)
        assert (job.status, job.trace_id) == (S.PROCESSING, TRACE)
    assert (await parts.store.get(TENANT, unrecorded.job_id)).shard_id == unrecorded.shard_id
    assert await parts.store.stats(TENANT) == {
        **empty_stats(),
        S.PROCESSING: 3,
        S.COMPLETED: 1,
        S.DEAD_LETTERED: 1,
    }
    await assert_counters_match(parts.store)


async def test_while_writes_are_buffered_receiving_leaves_begins_to_the_tracker(parts: Parts) -> None:
    first = await produce(parts, 1)
    await parts.store.transition(TENANT, first.job_id, S.PENDING, S.PROCESSING)
    second = await produce(parts, 2)
    with write_lock(parts.db):
        # The store times out: this write is buffered, so later writes must queue behind it.
        await parts.tracker.finish(first, S.COMPLETED, metadata=META)
    assert not parts.tracker.writes_directly
    received = await receive(parts, 2)
    assert [parts.path.take(m) for m in received] == [None, None]
    assert (await parts.store.get(TENANT, second.job_id)).status is S.PENDING
    # The completion steps aside too: the consumer's separate writes queue behind the buffer.
    assert not await parts.path.complete(received[1], second, vectors_of(second), META, TRACE)
    assert await parts.shards.get_vectors(TENANT, second.shard_id) is None


async def test_completing_saves_vectors_records_the_job_and_removes_the_message_together(parts: Parts) -> None:
    msg = await produce(parts, 1)
    [received] = await receive(parts, 1)
    taken = parts.path.take(received)
    assert taken is not None
    assert taken.begin is Begin.PROCEED

    assert await parts.path.complete(received, msg, vectors_of(msg), META, TRACE)

    job = await parts.store.get(TENANT, msg.job_id)
    assert (job.status, job.metadata, job.error, job.trace_id) == (S.COMPLETED, META, None, TRACE)
    assert job.completed_at is not None
    saved = await parts.shards.get_vectors(TENANT, msg.shard_id)
    assert saved is not None
    assert list(saved.chunks) == ["a", "b"]
    assert (await parts.queue.depth()).active == 0
    assert await parts.store.stats(TENANT) == {**empty_stats(), S.COMPLETED: 1}
    await assert_counters_match(parts.store)


async def test_a_completion_that_fails_part_way_leaves_nothing(parts: Parts) -> None:
    msg = await produce(parts, 1)
    [received] = await receive(parts, 1)
    parts.path.take(received)
    # The last write of the transaction, the message's removal, is refused.
    with sqlite3.connect(parts.db) as conn:
        conn.execute(
            "CREATE TRIGGER refuse_removal BEFORE DELETE ON queue_messages "
            "BEGIN SELECT RAISE(ABORT, 'removal refused'); END"
        )

    with pytest.raises(InvalidJobError, match="removal refused"):
        await parts.path.complete(received, msg, vectors_of(msg), META, TRACE)

    # The vectors and the completed record went with it: the redelivery finds the job as it was.
    assert await parts.shards.get_vectors(TENANT, msg.shard_id) is None
    assert (await parts.store.get(TENANT, msg.job_id)).status is S.PROCESSING
    assert (await parts.queue.depth()).active == 1
    await assert_counters_match(parts.store)


async def test_a_completion_after_the_lock_lapsed_keeps_the_work_and_the_redelivery_skips(tmp_path: Path) -> None:
    async with parts_on(tmp_path / "local.db", tmp_path / "spool", lock_duration=0.2) as p:
        msg = await produce(p, 1)
        [received] = await receive(p, 1)
        p.path.take(received)
        lapsed = received.locked_until.timestamp()
        await asyncio.to_thread(wait_for, lambda: time.time() > lapsed, 5.0, "the lock to lapse")

        assert await p.path.complete(received, msg, vectors_of(msg), META, TRACE)

        assert (await p.store.get(TENANT, msg.job_id)).status is S.COMPLETED
        assert await p.shards.get_vectors(TENANT, msg.shard_id) is not None
        [again] = await receive(p, 1)
        assert again.message_id == received.message_id
        taken = p.path.take(again)
        assert taken is not None
        assert (taken.begin, taken.shard) == (Begin.SKIP, None)
        await assert_counters_match(p.store)


async def test_a_completion_keeps_the_record_another_delivery_wrote_first(parts: Parts) -> None:
    msg = await produce(parts, 1)
    [received] = await receive(parts, 1)
    parts.path.take(received)
    first = JobMetadata("hashing-4", vector_count=7, chunk_count=7, processing_time_ms=1.0)
    await parts.store.transition(TENANT, msg.job_id, S.PROCESSING, S.COMPLETED, metadata=first)

    assert await parts.path.complete(received, msg, vectors_of(msg), META, TRACE)

    assert (await parts.store.get(TENANT, msg.job_id)).metadata == first
    assert (await parts.queue.depth()).active == 0
    assert await parts.store.stats(TENANT) == {**empty_stats(), S.COMPLETED: 1}
