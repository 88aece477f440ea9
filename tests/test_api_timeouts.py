"""The API under a store or queue that hangs: every request answers 503 within its timeout, and recovers.

Real parts only: a SQLite file whose write lock another connection holds (reads go on in WAL
mode; writes wait, and reads queued behind a waiting write on the store's connection wait
too), the Cosmos test server hanging or failing the job container, and a local queue whose
file is locked.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp.plugin import AiohttpClient

from exporter.app import create_app
from exporter.keys import API_TASKS
from jobs import sqlite_db
from jobs.cosmos_store import DEFAULT_CONTAINER, CosmosJobStore
from jobs.model import Job, JobStatus
from jobs.settings import Settings
from jobs.sqlite_store import SQLiteJobStore
from jobs.store import JobStore
from tests.components import wait_until
from tests.cosmos_server import CosmosServer, cosmos_database
from tests.helpers.api import queue_sender
from worker.local_queue import LocalQueue
from worker.messages import JobMessage, parse_message

S = JobStatus
Client = TestClient[web.Request, web.Application]
STORE_TIMEOUT = 1.0
QUEUE_TIMEOUT = 1.0
# What an answer may take beyond its timeout: scheduling, the JSON error, the test client.
MARGIN = 0.5
SETTINGS = Settings(store_timeout=STORE_TIMEOUT, queue_timeout=QUEUE_TIMEOUT, refresh_interval=3600)
ENDPOINTS = [
    ("GET", "/api/v1/embedding-jobs?tenantId=acme"),
    ("GET", "/api/v1/embedding-jobs/job-1?tenantId=acme"),
    ("GET", "/api/v1/embedding-jobs/stats?tenantId=acme"),
    ("GET", "/api/v1/embedding-jobs/stats"),
    ("GET", "/api/v1/overview"),
    ("POST", "/api/v1/embedding-jobs/job-1/retry?tenantId=acme"),
]
READS = [(method, url) for method, url in ENDPOINTS if method == "GET"]
RETRY = ENDPOINTS[-1]


async def timed(client: Client, method: str, url: str) -> tuple[int, Any, float]:
    """Status, JSON body and seconds taken of one request."""
    started = time.monotonic()
    response = await client.request(method, url)
    body = await response.json()
    return response.status, body, time.monotonic() - started


async def seed_failed_job(store: JobStore) -> None:
    job = Job.new(job_id="job-1", tenant_id="acme", shard_id="shard-1", shard_type_id="doc")
    await store.create(job)
    await store.transition("acme", "job-1", S.PENDING, S.PROCESSING)
    await store.transition("acme", "job-1", S.PROCESSING, S.FAILED, error="embedder said no", retry_count=1)


def assert_503_in_time(answer: tuple[int, Any, float], codes: set[str], within: float) -> None:
    status, body, elapsed = answer
    assert status == 503, body
    assert body["error"]["code"] in codes, body
    assert body["error"]["message"]
    assert elapsed < within, f"answered after {elapsed:.2f} s"


async def assert_recovered(client: Client, queue: LocalQueue) -> None:
    """Every endpoint answers again; the retry puts the job back to pending and sends its message."""
    for method, url in READS:
        status, body, _ = await timed(client, method, url)
        assert status == 200, (url, body)
    status, body, _ = await timed(client, *RETRY)
    assert (status, body["status"]) == (202, "pending"), body
    [message] = await queue.receive(max_messages=10, max_wait=0)
    assert parse_message(message.body) == JobMessage("job-1", "acme", "shard-1", "doc")


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[LocalQueue]:
    async with LocalQueue(tmp_path / "queue.db") as local:
        yield local


# -- SQLite: another connection holds the write lock -------------------------------------------


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SQLiteJobStore]:
    store = await SQLiteJobStore.open(tmp_path / "jobs.db")
    try:
        await seed_failed_job(store)
        yield store
    finally:
        await store.close()


@pytest.fixture
def write_lock(sqlite_store: SQLiteJobStore, tmp_path: Path) -> Iterator[sqlite3.Connection]:
    """Another connection to the store's file, ready to take the write lock (BEGIN EXCLUSIVE)."""
    conn = sqlite3.connect(tmp_path / "jobs.db", isolation_level=None)
    try:
        yield conn
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.close()


async def test_reads_answer_while_another_connection_holds_the_sqlite_write_lock(
    sqlite_store: SQLiteJobStore, write_lock: sqlite3.Connection, queue: LocalQueue, aiohttp_client: AiohttpClient
) -> None:
    client = await aiohttp_client(create_app(SETTINGS, sqlite_store, enqueue=queue_sender(queue)))
    write_lock.execute("BEGIN EXCLUSIVE")

    for method, url in READS:
        status, body, elapsed = await timed(client, method, url)
        assert status == 200, (url, body)
        assert elapsed < STORE_TIMEOUT


async def test_a_retry_waiting_on_the_sqlite_write_lock_answers_503_and_sends_its_message_once_the_write_lands(
    sqlite_store: SQLiteJobStore, write_lock: sqlite3.Connection, queue: LocalQueue, aiohttp_client: AiohttpClient
) -> None:
    app = create_app(SETTINGS, sqlite_store, enqueue=queue_sender(queue))
    client = await aiohttp_client(app)
    write_lock.execute("BEGIN EXCLUSIVE")

    retry = asyncio.create_task(timed(client, *RETRY))

    async def write_waiting() -> bool:
        return bool(app[API_TASKS])

    await wait_until(write_waiting, "the retry's write to wait on the lock")
    # The store's connection runs one call at a time: reads queued behind the waiting write wait too.
    reads = await asyncio.gather(*(timed(client, method, url) for method, url in READS))
    for answer in [*reads, await retry]:
        assert_503_in_time(answer, {"store_timeout"}, STORE_TIMEOUT + MARGIN)
    assert await queue.receive(max_wait=0) == []

    write_lock.execute("ROLLBACK")

    async def sent() -> bool:
        return not app[API_TASKS] and (await queue.depth()).active == 1

    await wait_until(sent, "the retry's message, sent once its write landed")
    assert (await sqlite_store.get("acme", "job-1")).status is S.PENDING
    [message] = await queue.receive(max_messages=10, max_wait=0)
    assert parse_message(message.body) == JobMessage("job-1", "acme", "shard-1", "doc")


async def test_a_retry_write_refused_after_its_request_timed_out_leaves_the_job_failed_without_a_message(
    tmp_path: Path, queue: LocalQueue, monkeypatch: pytest.MonkeyPatch, aiohttp_client: AiohttpClient
) -> None:
    # SQLite gives up on the lock after its busy timeout; shortened so the test need not wait 10 s.
    monkeypatch.setattr(sqlite_db, "BUSY_TIMEOUT_MS", 2000)
    store = await SQLiteJobStore.open(tmp_path / "jobs.db")
    conn = sqlite3.connect(tmp_path / "jobs.db", isolation_level=None)
    try:
        await seed_failed_job(store)
        app = create_app(SETTINGS, store, enqueue=queue_sender(queue))
        client = await aiohttp_client(app)
        conn.execute("BEGIN EXCLUSIVE")

        assert_503_in_time(await timed(client, *RETRY), {"store_timeout"}, STORE_TIMEOUT + MARGIN)

        async def write_refused() -> bool:
            return not app[API_TASKS]

        await wait_until(write_refused, "SQLite to refuse the waiting write")
        conn.execute("ROLLBACK")
        job = await store.get("acme", "job-1")
        assert (job.status, job.retry_count) == (S.FAILED, 1)
        assert await queue.receive(max_wait=0) == []
    finally:
        conn.close()
        await store.close()


# -- a queue that hangs --------------------------------------------------------------------------


async def test_a_send_that_times_out_dead_letters_the_job_and_a_late_message_finds_it_parked(
    sqlite_store: SQLiteJobStore, queue: LocalQueue, aiohttp_client: AiohttpClient
) -> None:
    app = create_app(SETTINGS, sqlite_store, enqueue=queue_sender(queue))
    client = await aiohttp_client(app)
    queue_lock = sqlite3.connect(queue.path, isolation_level=None)
    try:
        queue_lock.execute("BEGIN EXCLUSIVE")

        status, body, elapsed = await timed(client, *RETRY)

        assert status == 503
        reason = f"retry could not be enqueued: the queue did not answer within {QUEUE_TIMEOUT:g} s"
        assert body["error"] == {"code": "enqueue_failed", "message": f"{reason}; the job is dead_lettered again"}
        assert elapsed < QUEUE_TIMEOUT + MARGIN
        job = await sqlite_store.get("acme", "job-1")
        assert (job.status, job.error) == (S.DEAD_LETTERED, reason)
        # The send was only waiting for the lock: it lands now, and its message meets a parked job,
        # which a worker skips. The job is never pending without a message.
        queue_lock.execute("ROLLBACK")

        async def late_message() -> bool:
            return (await queue.depth()).active == 1

        await wait_until(late_message, "the late message")
        assert (await sqlite_store.get("acme", "job-1")).status is S.DEAD_LETTERED
    finally:
        if queue_lock.in_transaction:
            queue_lock.execute("ROLLBACK")
        queue_lock.close()


# -- Cosmos DB: the job container hangs or fails -------------------------------------------------


@pytest.fixture
async def cosmos_store(cosmos_server: CosmosServer) -> AsyncIterator[CosmosJobStore]:
    async with cosmos_database(cosmos_server) as db:
        store = await CosmosJobStore.open(client=db.client, database=db.name, create_if_missing=True)
        try:
            await seed_failed_job(store)
            yield store
        finally:
            cosmos_server.set_fault(DEFAULT_CONTAINER, None)
            await store.close()


# A failing container fails point reads at once; the SDK retries the 503s of queries until the
# store timeout cuts them short.
@pytest.mark.parametrize(
    ("fault", "codes"),
    [("hang", {"store_timeout"}), ("fail", {"store_unavailable", "store_timeout"})],
    ids=["hang", "fail"],
)
async def test_every_endpoint_answers_503_within_the_store_timeout_while_cosmos_hangs_or_fails_and_then_recovers(
    cosmos_server: CosmosServer,
    cosmos_store: CosmosJobStore,
    queue: LocalQueue,
    aiohttp_client: AiohttpClient,
    fault: str,
    codes: set[str],
) -> None:
    client = await aiohttp_client(create_app(SETTINGS, cosmos_store, enqueue=queue_sender(queue)))
    cosmos_server.set_fault(DEFAULT_CONTAINER, fault)
    try:
        answers = await asyncio.gather(*(timed(client, method, url) for method, url in ENDPOINTS))
    finally:
        cosmos_server.set_fault(DEFAULT_CONTAINER, None)

    for answer in answers:
        assert_503_in_time(answer, codes, STORE_TIMEOUT + MARGIN)
    job = await cosmos_store.get("acme", "job-1")
    assert job.status is S.FAILED
    assert await queue.receive(max_wait=0) == []
    await assert_recovered(client, queue)
