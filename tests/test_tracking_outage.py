"""Job-store outages and a worker killed during one: embedding goes on, and every record converges.

On the Cosmos DB test server the job container "embedding-jobs" hangs (requests held
unanswered, then served once the fault clears, so writes the worker gave up on may still
land) or fails (503), while the shards container stays readable; the queue is the local
one. Embeddings come from an OpenAI-compatible endpoint with a fixed latency, so the
embedding rate is set by the work, as in production, not by store round trips alone.

The outage lasts OUTAGE_DRILL_SECONDS: 10 in the suite, with a 1 s store timeout;
`OUTAGE_DRILL_SECONDS=30` runs the full drill with the default 5 s store timeout. The jobs in
flight when the store stops answering each lose one timeout, so the timeout's share of the
window sets the floor of the rate; docs/reliability.md records both.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from opentelemetry.sdk.trace import TracerProvider
from pytest_aiohttp.plugin import AiohttpServer

from embedding_jobs.cosmos import init_db
from jobs.cosmos_store import CosmosJobStore
from jobs.model import JobStatus
from jobs.sqlite_store import SQLiteJobStore
from jobs.store import JobStore, empty_stats
from jobs.telemetry import Outcome
from tests.components import wait_until
from tests.conftest import CosmosDatabase
from tests.cosmos_server import cosmos_client
from tests.helpers.cli import cli_env, cosmos_env
from worker.consumer import Consumer, ConsumerConfig
from worker.cosmos_shards import CosmosShardStore
from worker.embedders import create_embedder
from worker.local_queue import LocalQueue
from worker.messages import JobMessage
from worker.producer import Producer
from worker.shards import Shard, ShardStore, SQLiteShardStore
from worker.spool import SPOOL_DIR, Spool, read_spool, spool_files
from worker.tracing import get_tracer
from worker.tracker import JobTracker

S = JobStatus
OUTAGE_SECONDS = float(os.environ.get("OUTAGE_DRILL_SECONDS", "10"))
STORE_TIMEOUT = 5.0 if OUTAGE_SECONDS >= 30 else 1.0
NORMAL_SECONDS = 5.0
EMBED_LATENCY = 0.05
CONCURRENCY = 4
TENANTS = ("tenant-a", "tenant-b", "tenant-c")
SHARDS_PER_TENANT = 10
JOB_CONTAINER = "embedding-jobs"


@pytest.fixture
async def embeddings_url(aiohttp_server: AiohttpServer) -> str:
    """An OpenAI-compatible embeddings endpoint taking EMBED_LATENCY per request."""

    async def embeddings(request: web.Request) -> web.Response:
        body = await request.json()
        await asyncio.sleep(EMBED_LATENCY)  # the service's latency, not synchronisation
        data = [{"index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(body["input"]))]
        return web.json_response({"data": data, "model": body["model"]})

    app = web.Application()
    app.router.add_post("/embeddings", embeddings)
    server = await aiohttp_server(app)
    return str(server.make_url("/"))


@contextlib.contextmanager
def fault_cleared(db: CosmosDatabase) -> Iterator[None]:
    """Whatever happens in the test, the session's shared server ends without a fault."""
    try:
        yield
    finally:
        db.server.set_fault(JOB_CONTAINER, None)


async def set_fault(db: CosmosDatabase, mode: str | None) -> None:
    await asyncio.to_thread(db.server.set_fault, JOB_CONTAINER, mode)


async def seed_shards(shards: ShardStore) -> None:
    """SHARDS_PER_TENANT shards for every tenant; jobs reuse them."""
    for tenant in TENANTS:
        for n in range(SHARDS_PER_TENANT):
            text = f"Shard {n} of {tenant}: embedding pipelines turn text into vectors."
            await shards.put(Shard(tenant_id=tenant, id=f"shard-{n}", shard_type_id="document", text=text))


async def enqueue_jobs(producer: Producer, first: int, count: int, expected: dict[str, int]) -> None:
    """Pending jobs first .. first+count-1 over the seeded shards, counted per tenant into expected."""
    messages = [
        JobMessage(f"job-{n:05d}", TENANTS[n % len(TENANTS)], f"shard-{n % SHARDS_PER_TENANT}", "document")
        for n in range(first, first + count)
    ]
    for start in range(0, count, 64):
        await asyncio.gather(*(producer.enqueue(m) for m in messages[start : start + 64]))
    for m in messages:
        expected[m.tenant_id] = expected.get(m.tenant_id, 0) + 1


async def assert_converged(store: JobStore, expected: dict[str, int]) -> None:
    """Every job completed, and each tenant's maintained counters equal a recount of its records."""
    stats = await store.stats_all()
    assert stats == {t: {**empty_stats(), S.COMPLETED: n} for t, n in expected.items()}
    assert await store.recount() == stats


async def all_completed(store: JobStore, expected: dict[str, int]) -> bool:
    stats = await store.stats_all()
    return all(stats.get(t, {}).get(S.COMPLETED) == n for t, n in expected.items())


@dataclass(frozen=True)
class DrillFigures:
    """What one outage drill measured."""

    mode: str
    normal_rate: float
    outage_rate: float
    buffered_at_recovery: int
    replay_seconds: float
    store_failures: int

    @property
    def ratio(self) -> float:
        return self.outage_rate / self.normal_rate

    def __str__(self) -> str:
        return (
            f"{self.mode} {OUTAGE_SECONDS:g}s (store_timeout {STORE_TIMEOUT:g}s): normal {self.normal_rate:.1f} "
            f"embeddings/s, during the outage {self.outage_rate:.1f}/s (ratio {self.ratio:.2f}); "
            f"{self.buffered_at_recovery} writes buffered, replayed {self.replay_seconds:.2f}s after the fault "
            f"cleared; {self.store_failures} store calls failed or timed out"
        )


async def rate(consumer: Consumer, seconds: float) -> float:
    """Embeddings completed per second over the next `seconds` (a measurement window)."""
    before, started = consumer.processed[Outcome.COMPLETED], time.monotonic()
    await asyncio.sleep(seconds)
    return (consumer.processed[Outcome.COMPLETED] - before) / (time.monotonic() - started)


@pytest.mark.slow
@pytest.mark.timeout(90 + 3 * OUTAGE_SECONDS)
@pytest.mark.parametrize("mode", ["hang", "fail"])
async def test_embedding_goes_on_at_80_percent_through_a_job_store_outage_and_records_converge(
    mode: str, cosmos_db: CosmosDatabase, tmp_path: Path, embeddings_url: str
) -> None:
    await init_db(cosmos_db.client, cosmos_db.name, JOB_CONTAINER, "shards", "leases", retention=None)
    async with AsyncExitStack() as stack:
        observer = await CosmosJobStore.open(client=cosmos_db.client, database=cosmos_db.name)
        queue = await LocalQueue(tmp_path / "queue.db", lock_duration=30.0).open()
        stack.push_async_callback(queue.close)
        await seed_shards(await CosmosShardStore.open(client=cosmos_db.client, database=cosmos_db.name))
        producer = Producer(observer, queue, get_tracer(TracerProvider()))
        expected: dict[str, int] = {}
        # Enough work to warm up and fill the normal window at the most the embeddings endpoint allows.
        count = int(CONCURRENCY / EMBED_LATENCY * (NORMAL_SECONDS + 3))
        await enqueue_jobs(producer, 0, count, expected)

        # The worker's own client, shared by its job and shard stores as in production.
        client = await stack.enter_async_context(cosmos_client(cosmos_db.server))
        store = await CosmosJobStore.open(client=client, database=cosmos_db.name)
        shards = await CosmosShardStore.open(client=client, database=cosmos_db.name)
        tracker = JobTracker(store, timeout=STORE_TIMEOUT, spool=Spool.open(tmp_path / SPOOL_DIR))
        await stack.enter_async_context(tracker.running())
        embedder = create_embedder("openai", base_url=embeddings_url, model="drill", max_retries=0)
        stack.push_async_callback(embedder.close)
        consumer = Consumer(
            queue=queue,
            tracker=tracker,
            shards=shards,
            embedder=embedder,
            tracer=get_tracer(TracerProvider()),
            config=ConsumerConfig(concurrency=CONCURRENCY, receive_wait=0.1),
            rng=random.Random(1),
        )
        stop = asyncio.Event()
        run = asyncio.create_task(consumer.run(stop))

        async def stopped() -> None:
            stop.set()
            await run

        stack.push_async_callback(stopped)
        stack.enter_context(fault_cleared(cosmos_db))

        async def warmed_up() -> bool:
            # Past the first connections and the first embeddings: a steady rate from here.
            return consumer.processed[Outcome.COMPLETED] >= 60

        await wait_until(warmed_up, "the worker to get going")
        normal = await rate(consumer, NORMAL_SECONDS)
        # Enough more for the outage window at the rate just measured (the store is still up).
        backlog = count - consumer.processed[Outcome.COMPLETED]
        more = max(0, int(normal * (OUTAGE_SECONDS + 2) * 1.25) - backlog)
        await enqueue_jobs(producer, count, more, expected)
        count += more
        await set_fault(cosmos_db, mode)
        during = await rate(consumer, OUTAGE_SECONDS)
        buffered = tracker.buffered
        # The outage was real: writes were buffered, and spooled.
        assert sum(len(read_spool(p)) for p in spool_files(tmp_path / SPOOL_DIR)) == buffered > 0
        await set_fault(cosmos_db, None)
        cleared = time.monotonic()
        assert consumer.processed[Outcome.COMPLETED] < count, "the work ran out before the outage ended"
        assert tracker.store_failures >= 1

        async def replayed() -> bool:
            return tracker.buffered == 0

        await wait_until(replayed, "the buffered writes to replay", within=60)
        figures = DrillFigures(mode, normal, during, buffered, time.monotonic() - cleared, tracker.store_failures)
        print(f"\noutage drill: {figures}")
        assert figures.ratio >= 0.8, figures

        async def done() -> bool:
            return consumer.processed[Outcome.COMPLETED] >= count and tracker.buffered == 0

        await wait_until(done, "every job to be embedded", within=60)
        await assert_converged(observer, expected)
        print(f"all {count} jobs completed {time.monotonic() - cleared:.2f}s after the fault cleared")
        assert (tracker.dropped_writes, consumer.processed[Outcome.FAILED]) == (0, 0)
        assert tracker.replayed_writes >= buffered


class WorkerProcess:
    """An `embedding-jobs worker` process, its output in a log file."""

    def __init__(self, process: asyncio.subprocess.Process, log: Path) -> None:
        self.process = process
        self.log = log

    @classmethod
    async def start(cls, data_dir: Path, name: str, env: dict[str, str]) -> WorkerProcess:
        log = data_dir / f"{name}.log"
        with log.open("wb") as out:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "embedding_jobs", "worker", env=cli_env(data_dir, **env), stdout=out, stderr=out
            )
        return cls(process, log)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def kill(self) -> None:
        """SIGKILL, as an OOM kill or a lost node would: no drain, no last flush."""
        self.process.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(self.process.wait(), 10) == -signal.SIGKILL

    async def stop(self) -> None:
        """SIGTERM, and a clean exit."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(self.process.wait(), 40) == 0, self.output()[-3000:]


def spooled(directory: Path) -> dict[Path, int]:
    """Writes not yet replayed in each spool file of directory."""
    if not directory.exists():
        return {}
    return {path: len(read_spool(path)) for path in spool_files(directory)}


def worker_env(embeddings_url: str, **extra: str) -> dict[str, str]:
    return {
        "EMBEDDING_JOBS_EMBEDDER": "openai",
        "EMBEDDING_JOBS_OPENAI_ENDPOINT": embeddings_url,
        "EMBEDDING_JOBS_CONCURRENCY": str(CONCURRENCY),
        # A killed worker's messages come back soon.
        "EMBEDDING_JOBS_LOCK_DURATION": "3",
        "EMBEDDING_JOBS_STORE_TIMEOUT": "1",
        "EMBEDDING_JOBS_RECONCILE_INTERVAL": "0",
        **extra,
    }


@pytest.fixture
async def workers() -> AsyncIterator[list[WorkerProcess]]:
    """Worker processes a test starts; any still running at the end is killed."""
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        if worker.process.returncode is None:
            await worker.kill()


async def crash_mid_outage(
    data_dir: Path,
    env: dict[str, str],
    workers: list[WorkerProcess],
    progress: Callable[[], Awaitable[int]],
    start_outage: Callable[[], Awaitable[None]],
    spooled_at_least: int,
) -> tuple[WorkerProcess, int]:
    """A worker works, the outage starts, the worker is killed once it has spooled, and is restarted.

    The outage goes on: the caller ends it. Returns the restarted worker and how many writes
    the killed one left in its spool (which the restarted one has adopted).
    """
    spool_dir = data_dir / SPOOL_DIR
    first = await WorkerProcess.start(data_dir, "first", env)
    workers.append(first)

    async def working() -> bool:
        return await progress() >= 40

    await wait_until(working, "the first worker to complete some jobs", within=30)
    await start_outage()

    async def has_spooled() -> bool:
        return sum(spooled(spool_dir).values()) >= spooled_at_least

    # On SQLite the first write is spooled only after a shard save gives up at the 10 s busy timeout.
    await wait_until(has_spooled, "the worker to spool writes during the outage", within=60)
    await first.kill()
    [(orphan, left)] = spooled(spool_dir).items()
    assert left >= spooled_at_least

    second = await WorkerProcess.start(data_dir, "second", env)
    workers.append(second)

    async def adopted() -> bool:
        return not orphan.exists()

    await wait_until(adopted, "the restarted worker to adopt the dead one's spool", within=30)
    assert f"adopted {left} job-store write(s)" in second.output()
    return second, left


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["fail", "hang"])
async def test_a_worker_killed_mid_outage_and_restarted_loses_no_record(
    mode: str, cosmos_db: CosmosDatabase, tmp_path: Path, embeddings_url: str, workers: list[WorkerProcess]
) -> None:
    await init_db(cosmos_db.client, cosmos_db.name, JOB_CONTAINER, "shards", "leases", retention=None)
    observer = await CosmosJobStore.open(client=cosmos_db.client, database=cosmos_db.name)
    expected: dict[str, int] = {}
    async with LocalQueue(tmp_path / "embedding-jobs.db") as queue:
        await seed_shards(await CosmosShardStore.open(client=cosmos_db.client, database=cosmos_db.name))
        await enqueue_jobs(Producer(observer, queue, get_tracer(TracerProvider())), 0, 300, expected)

    async def completed() -> int:
        return sum(stats[S.COMPLETED] for stats in (await observer.stats_all()).values())

    with fault_cleared(cosmos_db):
        env = worker_env(embeddings_url, **cosmos_env(cosmos_db))
        worker, left = await crash_mid_outage(
            tmp_path, env, workers, completed, lambda: set_fault(cosmos_db, mode), spooled_at_least=30
        )
        await set_fault(cosmos_db, None)
    cleared = time.monotonic()

    async def converged() -> bool:
        return await all_completed(observer, expected)

    await wait_until(converged, "every job to complete", within=60)
    took = time.monotonic() - cleared
    await assert_converged(observer, expected)
    await worker.stop()
    # The restarted worker replayed everything and, stopping clean, left no spool behind.
    assert spooled(tmp_path / SPOOL_DIR) == {}
    print(
        f"\ncrash drill (cosmos {mode}): the killed worker left {left} writes in its spool; "
        f"every job completed {took:.2f}s after the fault cleared"
    )


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_a_worker_killed_while_the_sqlite_file_is_locked_loses_no_record(
    tmp_path: Path, embeddings_url: str, workers: list[WorkerProcess]
) -> None:
    # One file holds jobs, shards and the queue: a held write lock stalls every writer, embedding
    # included, so the first write spooled comes only once a shard write gives up (the 10 s busy
    # timeout). What must hold is that timed-out calls do not wedge the connection's thread and
    # that the writes spooled before the kill converge once the lock is gone.
    db = tmp_path / "embedding-jobs.db"
    expected: dict[str, int] = {}
    store = await SQLiteJobStore.open(db)
    try:
        async with LocalQueue(db) as queue:
            shards = await SQLiteShardStore.open(db)
            await seed_shards(shards)
            await shards.close()
            await enqueue_jobs(Producer(store, queue, get_tracer(TracerProvider())), 0, 300, expected)

        async def completed() -> int:
            return sum(stats[S.COMPLETED] for stats in (await store.stats_all()).values())

        lock = sqlite3.connect(db, isolation_level=None, timeout=10)

        async def take_the_lock() -> None:
            lock.execute("BEGIN IMMEDIATE")

        try:
            env = worker_env(embeddings_url, EMBEDDING_JOBS_STORE_TIMEOUT="0.5")
            worker, left = await crash_mid_outage(tmp_path, env, workers, completed, take_the_lock, spooled_at_least=1)
            lock.execute("ROLLBACK")
        finally:
            lock.close()
        cleared = time.monotonic()

        async def converged() -> bool:
            return await all_completed(store, expected)

        await wait_until(converged, "every job to complete", within=60)
        took = time.monotonic() - cleared
        await assert_converged(store, expected)
        await worker.stop()
        assert spooled(tmp_path / SPOOL_DIR) == {}
        print(
            f"\ncrash drill (sqlite lock): the killed worker left {left} writes in its spool; "
            f"every job completed {took:.2f}s after the lock was released"
        )
    finally:
        await store.close()
