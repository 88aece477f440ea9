"""The job tracker on a real SQLite store: bounded waits, buffering, ordered and idempotent replays."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from embedding_jobs.backends import build_tracker
from jobs.model import Job, JobMetadata, JobStatus
from jobs.settings import Settings
from jobs.sqlite_store import SQLiteJobStore
from jobs.store import empty_stats
from tests.components import wait_until
from worker.messages import JobMessage
from worker.spool import Spool, TrackedWrite, read_spool, spool_files
from worker.tracker import Begin, JobTracker

S = JobStatus
TIMEOUT = 0.3
META = JobMetadata("hashing", vector_count=2, chunk_count=2, processing_time_ms=1.0)


def msg(n: int, attempt: int = 0) -> JobMessage:
    return JobMessage(f"job-{n}", "tenant-a", f"shard-{n}", "document", attempt)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteJobStore]:
    opened = await SQLiteJobStore.open(tmp_path / "jobs.db")
    try:
        yield opened
    finally:
        await opened.close()


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


def tracker_on(store: SQLiteJobStore, spool: Spool, buffer_size: int = 10_000) -> JobTracker:
    return JobTracker(store, timeout=TIMEOUT, retry_initial=0.05, retry_max=0.2, spool=spool, buffer_size=buffer_size)


async def settled(tracker: JobTracker) -> None:
    async def empty() -> bool:
        return tracker.buffered == 0

    await wait_until(empty, "buffered writes to replay")


async def test_a_stalled_store_costs_one_timeout_then_writes_buffer_at_once(
    store: SQLiteJobStore, tmp_path: Path
) -> None:
    for n in range(20):
        await store.create(Job.new(job_id=f"job-{n}", tenant_id="tenant-a", shard_id=f"shard-{n}", shard_type_id="d"))
    tracker = tracker_on(store, Spool.open(tmp_path / "spool"))
    async with tracker.running():
        with write_lock(tmp_path / "jobs.db"):
            started = time.monotonic()
            for n in range(20):
                assert await tracker.begin(msg(n), trace_id=None) is Begin.PROCEED
            elapsed = time.monotonic() - started
            # The first write waited out the timeout; the other 19 did not wait for the store at all.
            assert TIMEOUT <= elapsed < TIMEOUT + 0.5, elapsed
            assert tracker.buffered == 20
            [path] = spool_files(tmp_path / "spool")
            assert len(read_spool(path)) == 20
            # Probes meanwhile time out too, one at a time, and queue nothing on the connection's thread.
            failures = tracker.store_failures

            async def probed_twice() -> bool:
                return tracker.store_failures >= failures + 2

            await wait_until(probed_twice, "two more probes")
        # The first begin, still waiting on the connection's thread when it timed out, lands
        # now; its replay then finds the job processing and changes nothing.
        await settled(tracker)
    assert tracker.dropped_writes == 0
    assert tracker.replayed_writes == 20
    assert await store.stats("tenant-a") == {**empty_stats(), S.PROCESSING: 20}
    assert await store.recount("tenant-a") == {"tenant-a": {**empty_stats(), S.PROCESSING: 20}}
    assert spool_files(tmp_path / "spool") == []


async def test_a_timed_out_finish_that_lands_later_is_replayed_harmlessly(
    store: SQLiteJobStore, tmp_path: Path
) -> None:
    await store.create(Job.new(job_id="job-1", tenant_id="tenant-a", shard_id="shard-1", shard_type_id="d"))
    tracker = tracker_on(store, Spool.open(tmp_path / "spool"))
    async with tracker.running():
        assert await tracker.begin(msg(1), trace_id=None) is Begin.PROCEED
        with write_lock(tmp_path / "jobs.db"):
            await tracker.finish(msg(1), S.COMPLETED, metadata=META)
            assert tracker.buffered == 1
        await settled(tracker)
    done = await store.get("tenant-a", "job-1")
    assert (done.status, done.metadata) == (S.COMPLETED, META)
    assert await store.recount("tenant-a") == {"tenant-a": {**empty_stats(), S.COMPLETED: 1}}


async def test_writes_replayed_twice_after_a_crash_end_in_the_same_records(
    store: SQLiteJobStore, tmp_path: Path
) -> None:
    def failed(m: JobMessage) -> TrackedWrite:
        return TrackedWrite.finish(m, S.FAILED, error="RetryableError: 503", retry_count=1, metadata=None)

    writes = [
        TrackedWrite.begin(msg(1), None),
        failed(msg(1)),
        TrackedWrite.begin(msg(2), None),
        failed(msg(2)),
        TrackedWrite.begin(msg(1, attempt=1), None),
        TrackedWrite.finish(msg(1, attempt=1), S.COMPLETED, error=None, retry_count=None, metadata=META),
    ]
    # Recorded once: job 1 failed, then completed on its retry; job 2 failed and awaits its retry.
    for n in (1, 2):
        await store.create(Job.new(job_id=f"job-{n}", tenant_id="tenant-a", shard_id=f"shard-{n}", shard_type_id="d"))
    recorded = tracker_on(store, Spool())
    async with recorded.running():
        for n in (1, 2):
            await recorded.begin(msg(n), trace_id=None)
            await recorded.finish(msg(n), S.FAILED, error="RetryableError: 503", retry_count=1)
        await recorded.begin(msg(1, attempt=1), trace_id=None)
        await recorded.finish(msg(1, attempt=1), S.COMPLETED, metadata=META)
    assert recorded.store_failures == 0
    before = {n: (await store.get("tenant-a", f"job-{n}")).to_json() for n in (1, 2)}

    # The same writes spooled and never acknowledged: the worker died before it could.
    dead = Spool.open(tmp_path / "spool")
    for write in writes:
        dead.append(write)
    dead.close()
    tracker = tracker_on(store, Spool.open(tmp_path / "spool"))
    assert tracker.adopted_writes == 6
    async with tracker.running():
        await settled(tracker)
    assert tracker.replayed_writes == 6
    after = {n: (await store.get("tenant-a", f"job-{n}")).to_json() for n in (1, 2)}
    # A finished job is not touched at all; an unfinished one ends where its history ends.
    assert after[1] == before[1]
    fields = ("status", "retryCount", "error", "metadata", "traceId")
    assert {k: after[2].get(k) for k in fields} == {k: before[2].get(k) for k in fields}
    assert before[2]["status"] == "failed"
    counts = {**empty_stats(), S.COMPLETED: 1, S.FAILED: 1}
    assert await store.stats("tenant-a") == counts
    assert await store.recount("tenant-a") == {"tenant-a": counts}


async def test_a_redelivery_queued_behind_a_dead_workers_failure_still_completes(
    store: SQLiteJobStore, tmp_path: Path
) -> None:
    # A worker began job 1, failed it while the store was down, and died before sending the retry.
    await store.create(Job.new(job_id="job-1", tenant_id="tenant-a", shard_id="shard-1", shard_type_id="d"))
    await store.transition("tenant-a", "job-1", S.PENDING, S.PROCESSING)
    dead = Spool.open(tmp_path / "spool")
    dead.append(TrackedWrite.finish(msg(1), S.FAILED, error="StoreUnavailableError", retry_count=1, metadata=None))
    dead.close()
    tracker = tracker_on(store, Spool.open(tmp_path / "spool"))
    async with tracker.running():
        # Its message comes back (same attempt) and this time the work succeeds; both writes
        # queue behind the adopted failure, so the begin meets a failed job and must take it on.
        assert await tracker.begin(msg(1), trace_id=None) is Begin.PROCEED
        await tracker.finish(msg(1), S.COMPLETED, metadata=META)
        assert tracker.buffered == 3
        await settled(tracker)
    done = await store.get("tenant-a", "job-1")
    assert (done.status, done.metadata) == (S.COMPLETED, META)
    assert await store.recount("tenant-a") == {"tenant-a": {**empty_stats(), S.COMPLETED: 1}}


async def test_a_jobs_new_write_queues_behind_its_adopted_ones(store: SQLiteJobStore, tmp_path: Path) -> None:
    await store.create(Job.new(job_id="job-1", tenant_id="tenant-a", shard_id="shard-1", shard_type_id="d"))
    dead = Spool.open(tmp_path / "spool")
    dead.append(TrackedWrite.begin(msg(1), None))
    dead.close()
    tracker = tracker_on(store, Spool.open(tmp_path / "spool"))
    async with tracker.running():
        # The store is up, but the adopted begin has not been replayed yet: the finish waits behind it.
        await tracker.finish(msg(1), S.COMPLETED, metadata=META)
        assert tracker.buffered == 2
        await settled(tracker)
    assert (await store.get("tenant-a", "job-1")).status is S.COMPLETED


async def test_a_full_buffer_drops_and_counts_writes(store: SQLiteJobStore, tmp_path: Path) -> None:
    for n in range(5):
        await store.create(Job.new(job_id=f"job-{n}", tenant_id="tenant-a", shard_id=f"shard-{n}", shard_type_id="d"))
    tracker = tracker_on(store, Spool.open(tmp_path / "spool"), buffer_size=3)
    async with tracker.running():
        with write_lock(tmp_path / "jobs.db"):
            for n in range(5):
                await tracker.begin(msg(n), trace_id=None)
            assert (tracker.buffered, tracker.dropped_writes) == (3, 2)
            [path] = spool_files(tmp_path / "spool")
            assert len(read_spool(path)) == 3
        await settled(tracker)
    statuses = [(await store.get("tenant-a", f"job-{n}")).status for n in range(5)]
    assert statuses == [S.PROCESSING] * 3 + [S.PENDING] * 2


async def test_a_data_dir_that_cannot_hold_the_spool_is_a_clear_error(store: SQLiteJobStore, tmp_path: Path) -> None:
    occupied = tmp_path / "not-a-folder"
    occupied.write_text("")
    settings = Settings.load(environ={"EMBEDDING_JOBS_DATA_DIR": str(occupied)})
    with pytest.raises(ValueError, match=r"tracking spool .*--data-dir"):
        build_tracker(settings, store)
