"""What only the SQLite backend promises: file sharing between processes, paging internals."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from jobs import sqlite_store
from jobs.errors import StoreUnavailableError
from jobs.model import Job, JobMetadata, JobStatus
from jobs.sqlite_db import BUSY_TIMEOUT_MS, HELD_BUSY_TIMEOUT_MS, SQLiteDatabase
from jobs.sqlite_store import SQLiteJobStore, stuck_query
from jobs.store import empty_stats

WORKER = textwrap.dedent(
    """
    import asyncio, sys
    from jobs.errors import TransitionConflictError
    from jobs.model import JobStatus as S
    from jobs.sqlite_store import SQLiteJobStore

    async def main(path, n):
        store = await SQLiteJobStore.open(path)
        won = 0
        for i in range(n):
            try:
                await store.transition("t", f"job-{i}", S.PENDING, S.PROCESSING)
                won += 1
            except TransitionConflictError:
                pass
        await store.close()
        print(won)

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)


async def _seed(path: Path, n: int) -> None:
    async with await SQLiteJobStore.open(path) as store:
        for i in range(n):
            await store.create(Job.new(job_id=f"job-{i}", tenant_id="t", shard_id=f"s{i}", shard_type_id="d"))


async def _stats(path: Path) -> dict[JobStatus, int]:
    async with await SQLiteJobStore.open(path) as store:
        return await store.stats("t")


def test_two_processes_claim_each_job_exactly_once(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    n = 200
    asyncio.run(_seed(path, n))
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(path), str(n)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=50)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum(int(out) for out in outputs) == n
    assert asyncio.run(_stats(path)) == {**empty_stats(), JobStatus.PROCESSING: n}


async def test_stats_all_reads_counters_in_pages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_store, "_STATS_PAGE_ROWS", 2)
    async with await SQLiteJobStore.open(tmp_path / "jobs.db") as store:
        for i in range(7):
            await store.create(Job.new(job_id="j", tenant_id=f"t{i}", shard_id="s", shard_type_id="d"))
        stats = await store.stats_all()
    assert sorted(stats) == [f"t{i}" for i in range(7)]
    assert all(s[JobStatus.PENDING] == 1 for s in stats.values())


async def test_unopenable_path_raises_store_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreUnavailableError, match="cannot open job store"):
        await SQLiteJobStore.open(blocker / "jobs.db")


async def test_closed_store_raises_store_unavailable(tmp_path: Path) -> None:
    store = await SQLiteJobStore.open(tmp_path / "jobs.db")
    await store.close()
    with pytest.raises(StoreUnavailableError):
        await store.ping()


# sqlite_stat1 as ANALYZE writes it for a million jobs of 50 tenants, nearly all completed:
# with these figures the planner, left to itself, scans jobs_tenant_status_created for stuck().
MILLION_JOB_STATS = [
    ("jobs", "jobs_status_updated", "1000000 250000 1"),
    ("jobs", "jobs_tenant_shard_updated", "1000000 20000 1 1"),
    ("jobs", "jobs_tenant_created", "1000000 20000 1 1"),
    ("jobs", "jobs_tenant_status_created", "1000000 20000 9901 1 1"),
    ("jobs", "jobs", "1000000 20000 1"),
]


def _set_updated_at(path: Path, job_id: str, updated_at: str) -> None:
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE jobs SET updated_at = ? WHERE id = ?", (updated_at, job_id))


async def test_stuck_searches_the_status_updated_index_even_with_analyze_statistics(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    await _seed(path, 3)
    _set_updated_at(path, "job-0", "2020-01-01T00:00:00.000Z")
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("ANALYZE")
        conn.execute("DELETE FROM sqlite_stat1")
        conn.executemany("INSERT INTO sqlite_stat1 (tbl, idx, stat) VALUES (?, ?, ?)", MILLION_JOB_STATS)
    # A new connection loads the statistics, as the store's does when it opens the file.
    with closing(sqlite3.connect(path)) as conn:
        sql, params = stuck_query([JobStatus.PENDING, JobStatus.PROCESSING], "2021-01-01T00:00:00.000Z")
        plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
    assert plan[0] == "SEARCH jobs USING COVERING INDEX jobs_status_updated (status=? AND updated_at<?)", plan
    async with await SQLiteJobStore.open(path) as store:
        stuck = await store.stuck(timedelta(minutes=15))
    assert [(s.tenant_id, s.status, s.count) for s in stuck] == [("t", JobStatus.PENDING, 1)]
    assert stuck[0].oldest_updated_at == datetime(2020, 1, 1, tzinfo=UTC)


async def test_opening_a_file_without_the_stuck_index_adds_it(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    await _seed(path, 2)
    _set_updated_at(path, "job-1", "2020-01-01T00:00:00.000Z")
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("DROP INDEX jobs_status_updated")
    async with await SQLiteJobStore.open(path) as store:
        stuck = await store.stuck(timedelta(minutes=15))
    assert [(s.tenant_id, s.status, s.count) for s in stuck] == [("t", JobStatus.PENDING, 1)]


async def test_jobs_are_read_as_the_json_records_they_were_written_as(tmp_path: Path) -> None:
    written = Job(
        id="job-1",
        tenant_id="t",
        shard_id="s",
        shard_type_id="d",
        status=JobStatus.COMPLETED,
        error='é "quoted"\n\x01',
        created_at=datetime(2026, 1, 2, 3, 4, 5, 6000, tzinfo=UTC),
        updated_at=datetime(2026, 1, 2, 3, 4, 6, tzinfo=UTC),
        completed_at=datetime(2026, 1, 2, 3, 4, 6, tzinfo=UTC),
        metadata=JobMetadata(embedding_model="m", vector_count=2, processing_time_ms=0.30000000000000004),
    )
    async with await SQLiteJobStore.open(tmp_path / "jobs.db") as store:
        await store.create(written)
        read = await store.get("t", "job-1")
        listed = (await store.list("t")).items[0]
    for job in (read, listed):
        assert json.loads(job.to_json_text()) == written.to_json()
        assert job == written


async def test_a_reopened_job_has_no_completed_at_in_its_record(tmp_path: Path) -> None:
    async with await SQLiteJobStore.open(tmp_path / "jobs.db") as store:
        await store.create(Job.new(job_id="j", tenant_id="t", shard_id="s", shard_type_id="d"))
        await store.transition("t", "j", JobStatus.PENDING, JobStatus.DEAD_LETTERED, error="gave up")
        await store.transition("t", "j", JobStatus.DEAD_LETTERED, JobStatus.PENDING)
        record = json.loads((await store.get("t", "j")).to_json_text())
        assert "completedAt" not in record
        assert record["error"] == "gave up"


async def test_everything_on_one_file_shares_one_connection_and_thread(tmp_path: Path) -> None:
    db = tmp_path / "local.db"
    first = await SQLiteDatabase.open(db, "CREATE TABLE IF NOT EXISTS a (x)")
    second = await SQLiteDatabase.open(tmp_path / "." / "local.db", "CREATE TABLE IF NOT EXISTS b (x)")
    other = await SQLiteDatabase.open(tmp_path / "other.db", "")
    try:
        assert first.shares_connection_with(second)
        assert not first.shares_connection_with(other)
        threads = {await handle.run(lambda conn: threading.get_ident()) for handle in (first, second)}
        assert len(threads) == 1
        # Both schemas were applied on the one connection, and the connection outlives one handle.
        await first.close()
        tables = await second.run(lambda conn: {r[0] for r in conn.execute("SELECT name FROM sqlite_master")})
        assert {"a", "b"} <= tables
    finally:
        for handle in (first, second, other):
            await handle.close()
    with pytest.raises(StoreUnavailableError):
        await second.run(lambda conn: None)


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_once_the_file_is_held_past_the_busy_timeout_queued_writes_fail_fast(tmp_path: Path) -> None:
    db = tmp_path / "jobs.db"
    async with await SQLiteJobStore.open(db) as store:
        jobs = [Job.new(job_id=f"j{n}", tenant_id="t", shard_id="s", shard_type_id="d") for n in range(6)]
        lock = sqlite3.connect(db, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        try:
            started = time.monotonic()
            results = await asyncio.gather(*(store.create(job) for job in jobs), return_exceptions=True)
            elapsed = time.monotonic() - started
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        assert all(isinstance(r, StoreUnavailableError) for r in results), results
        # The first waited out the busy timeout; the five queued behind it did not each wait as long.
        busy = BUSY_TIMEOUT_MS / 1000
        assert busy <= elapsed < busy + 5 * HELD_BUSY_TIMEOUT_MS / 1000 + 2, elapsed
        # Once a write gets through, writes wait the full busy timeout again.
        await store.create(jobs[0])
        timeout = await store.database.run(lambda conn: conn.execute("PRAGMA busy_timeout").fetchone()[0])
        assert timeout == BUSY_TIMEOUT_MS
