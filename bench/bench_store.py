"""Cost of a job's lifecycle in the SQLite store, as a ratio to the bare SQL it runs.

A lifecycle is create + pending->processing + processing->completed, each atomic with its
tenant counter update. Baseline: the same three write transactions issued directly through
sqlite3 on the same thread kind, without the asyncio hop or model validation.
Run: python -m bench.bench_store
"""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
import time
from pathlib import Path

from jobs.model import Job, JobStatus
from jobs.sqlite_store import SCHEMA, SQLiteJobStore

N = 2_000
S = JobStatus


async def lifecycles(path: Path) -> float:
    """Seconds for N lifecycles through SQLiteJobStore."""
    store = await SQLiteJobStore.open(path)
    started = time.perf_counter()
    for i in range(N):
        job = Job.new(job_id=f"j{i}", tenant_id=f"t{i % 20}", shard_id=f"s{i}", shard_type_id="d")
        await store.create(job)
        await store.transition(job.tenant_id, job.id, S.PENDING, S.PROCESSING)
        await store.transition(job.tenant_id, job.id, S.PROCESSING, S.COMPLETED)
    elapsed = time.perf_counter() - started
    await store.close()
    return elapsed


def bare(path: Path) -> float:
    """Seconds for the same writes as plain SQL transactions."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.executescript(SCHEMA)
    bump = (
        "INSERT INTO job_counters (tenant_id, status, count) VALUES (?, ?, ?) "
        "ON CONFLICT (tenant_id, status) DO UPDATE SET count = count + excluded.count"
    )
    started = time.perf_counter()
    for i in range(N):
        tenant, job = f"t{i % 20}", f"j{i}"
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO jobs (tenant_id, id, shard_id, shard_type_id, status, created_at, updated_at) "
            "VALUES (?, ?, ?, 'd', 'pending', '2026-01-01T00:00:00.000Z', '2026-01-01T00:00:00.000Z')",
            (tenant, job, f"s{i}"),
        )
        conn.execute(bump, (tenant, "pending", 1))
        conn.execute("COMMIT")
        for old, new in (("pending", "processing"), ("processing", "completed")):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "UPDATE jobs SET status = ? WHERE tenant_id = ? AND id = ? AND status = ?", (new, tenant, job, old)
            )
            conn.execute(bump, (tenant, old, -1))
            conn.execute(bump, (tenant, new, 1))
            conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    return elapsed


def main() -> None:
    """Print lifecycles per second and the ratio to bare SQL."""
    with tempfile.TemporaryDirectory() as tmp:
        store_time = asyncio.run(lifecycles(Path(tmp) / "store.db"))
        bare_time = bare(Path(tmp) / "bare.db")
    print(f"store: {N / store_time:.0f} job lifecycles/s, {store_time / bare_time:.2f}x bare SQL transactions")


if __name__ == "__main__":
    main()
