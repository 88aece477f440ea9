"""stuck() on the SQLite store at 1M jobs, as a ratio to the same call at 10k jobs.

Both files hold the mix a running deployment has: nearly every job finished (completed, one
in a thousand failed), 300 pending/processing jobs updated in the last minutes, and 10 stuck
ones, updated two hours ago, over 50 tenants. Both carry ANALYZE statistics, as a file gets
from `PRAGMA optimize` or an operator's ANALYZE: with them SQLite's own choice of plan for
this query scans every job, which the store's pinned plan avoids. The figure is the
whole store call (thread hop included), median of many calls per round, rounds interleaved.
Run: python -m bench stuck
"""

from __future__ import annotations

import asyncio
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

from bench.exporter_rig import insert_jobs
from bench.harness import Figure, interleaved, ratios, report
from jobs.model import JobStatus, format_time, utcnow
from jobs.sqlite_store import COLUMNS, SCHEMA, SQLiteJobStore, stuck_query

SIZES = (10_000, 1_000_000)
TENANTS = 50
RECENT = 300
STUCK = 10
STUCK_AFTER = timedelta(minutes=15)
ROUNDS = 15
CALLS = 300
TARGET = 1.2
METADATA = '{"embeddingModel": "hashing-256", "vectorCount": 12, "processingTimeMs": 84.25}'


def build(path: Path, jobs: int) -> None:
    """jobs rows of the mix above, inserted in bulk; the indexes built afterwards, then ANALYZE."""
    now = utcnow()
    first = now - timedelta(days=30)
    step = timedelta(days=29) / jobs

    def rows() -> Iterator[tuple[object, ...]]:
        for i in range(jobs):
            status, at = "completed", format_time(first + step * i)
            if i < STUCK:
                status, at = ("pending", "processing")[i % 2], format_time(now - timedelta(hours=2, seconds=i))
            elif i >= jobs - RECENT:
                status, at = ("pending", "processing")[i % 2], format_time(now - timedelta(seconds=jobs - i))
            elif i % 1000 == 999:
                status = "failed"
            done = at if status == "completed" else None
            tenant = f"tenant-{i % TENANTS:02d}"
            yield (tenant, f"job-{i:07d}", f"shard-{i}", "document", status, 0, None, at, at, done, None, METADATA)

    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = OFF")
        conn.execute("PRAGMA synchronous = OFF")
        conn.executescript(SCHEMA)
        indexes = [
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND sql NOT NULL")
        ]
        for name in indexes:
            conn.execute(f"DROP INDEX {name}")
        insert_jobs(conn, COLUMNS, rows())
        conn.executescript(SCHEMA)  # the same idempotent DDL the store runs at open: builds the indexes
        conn.execute("ANALYZE")
    finally:
        conn.close()


def unpinned_seconds(path: Path) -> float:
    """One run of stuck()'s query with the planner left to choose (no INDEXED BY), for context."""
    sql, params = stuck_query([JobStatus.PENDING, JobStatus.PROCESSING], format_time(utcnow() - STUCK_AFTER))
    conn = sqlite3.connect(path)
    try:
        started = time.perf_counter()
        conn.execute(sql.replace("INDEXED BY jobs_status_updated ", ""), params).fetchall()
        return time.perf_counter() - started
    finally:
        conn.close()


def main() -> None:
    """Print stuck() at 1M jobs against 10k jobs."""
    with tempfile.TemporaryDirectory() as tmp, asyncio.Runner() as runner:
        paths = [Path(tmp) / f"jobs-{size}.db" for size in SIZES]
        for path, size in zip(paths, SIZES, strict=True):
            started = time.perf_counter()
            build(path, size)
            print(f"built {size} jobs in {time.perf_counter() - started:.1f} s", flush=True)
        stores = [runner.run(SQLiteJobStore.open(path)) for path in paths]

        def timed(store: SQLiteJobStore) -> float:
            durations = []
            for _ in range(CALLS):
                started = time.perf_counter()
                stuck = runner.run(store.stuck(STUCK_AFTER))
                durations.append(time.perf_counter() - started)
                assert sum(s.count for s in stuck) == STUCK, stuck
            return statistics.median(durations)

        try:
            small, large = interleaved(ROUNDS, lambda: timed(stores[0]), lambda: timed(stores[1]))
        finally:
            for store in stores:
                runner.run(store.close())
        unpinned = [unpinned_seconds(path) for path in paths]
    ratio = ratios(large, small)
    report(
        "sqlite stuck() 1M vs 10k jobs",
        f"{Figure.of(large).show('ms', 1e3, 3)} vs {Figure.of(small).show('ms', 1e3, 3)}, ratio {ratio.show('x')} "
        f"({RECENT} pending/processing recent, {STUCK} stuck; planner's own plan: "
        f"{unpinned[1] * 1e3:.0f} ms vs {unpinned[0] * 1e3:.1f} ms)",
        f"<= {TARGET}x",
        ratio.median <= TARGET,
    )


if __name__ == "__main__":
    main()
