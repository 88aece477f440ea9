"""What only the SQLite backend promises: file sharing between processes, paging internals."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jobs import sqlite_store
from jobs.errors import StoreUnavailableError
from jobs.model import Job, JobStatus
from jobs.sqlite_store import SQLiteJobStore
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
