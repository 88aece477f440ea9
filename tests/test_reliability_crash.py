"""Crash drill: SIGKILL the worker five times during 500 jobs, then run to idle; nothing is lost.

Real `embedding-jobs` processes on both queues: the local SQLite queue with the SQLite store,
and the Service Bus test peer (driven by the real azure-servicebus SDK) with the Cosmos DB
test server as the store. `ingest` produces; `embedding-jobs worker` consumes and is killed
with SIGKILL (no drain, no final flush) each time a further share of the jobs has finished,
then started again. Some jobs fail on purpose, through the worker's real failure paths:
an embeddings endpoint that answers 503 once (retried, then completed), always (dead-lettered
after the attempt limit) or 400 (dead-lettered at once), and shards deleted after their job was
enqueued (ShardNotFoundError, dead-lettered at once).

docs/reliability.md records the figures these tests print.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest
from aiohttp import web
from pytest_aiohttp.plugin import AiohttpServer

from jobs.cosmos_store import CosmosJobStore
from jobs.model import Job, JobStatus
from jobs.sqlite_store import SQLiteJobStore
from jobs.store import JobStore
from tests.components import wait_until
from tests.conftest import CosmosDatabase
from tests.helpers.cli import cli_env, cosmos_env, run_cli
from tests.servicebus_peer import ServiceBusPeer
from worker.consumer import REASON_JOB_DEAD_LETTERED, REASON_MAX_ATTEMPTS, REASON_PERMANENT
from worker.local_queue import LocalQueue
from worker.producer import job_id_for
from worker.shards import Shard

S = JobStatus
JOBS = 500
TENANTS = ("acme", "globex")
# Kill points, as jobs finished (completed or dead-lettered): spread over the run, the last
# with about a quarter of the work still to do.
KILL_AT = (60, 140, 220, 300, 380)
MAX_ATTEMPTS = 3
# Short locks so the messages a killed worker held come back within the drill.
LOCK_SECONDS = 2.0
PROGRESS_TIMEOUT = 40.0
POLL = 0.02

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


# -- the corpus and what each job must end as ----------------------------------------------


@dataclass(frozen=True, slots=True)
class Planned:
    """One shard of the drill and the fate its job must meet."""

    shard: Shard
    status: JobStatus
    reason: str | None = None  # the dead-letter reason, for dead-lettered jobs
    delete_shard: bool = False

    @property
    def job_id(self) -> str:
        return job_id_for(self.shard)


def plan() -> list[Planned]:
    """500 shards over two tenants: 460 complete (20 after one failure), 40 are dead-lettered."""
    planned = []
    for n in range(JOBS):
        tenant = TENANTS[n % len(TENANTS)]
        marker, status, reason, delete = "", S.COMPLETED, None, False
        if n % 25 == 3:
            marker = "FAIL_ONCE"  # 503 on the first call: failed, retried, completed
        elif n % 50 == 7:
            marker, status, reason = "FAIL_ALWAYS", S.DEAD_LETTERED, REASON_MAX_ATTEMPTS
        elif n % 50 == 11:
            marker, status, reason = "REJECT", S.DEAD_LETTERED, REASON_PERMANENT
        elif n % 25 == 17:
            status, reason, delete = S.DEAD_LETTERED, REASON_PERMANENT, True
        text = f"{marker} shard {n} of {tenant}: embedding pipelines turn text into vectors.".strip()
        shard = Shard(tenant_id=tenant, id=f"s{n:03d}", shard_type_id="document", text=text)
        planned.append(Planned(shard, status, reason, delete))
    return planned


@pytest.fixture
async def embeddings(aiohttp_server: AiohttpServer) -> str:
    """An OpenAI-compatible embeddings endpoint that fails on the markers in the text."""
    failed_once: set[str] = set()

    async def embed(request: web.Request) -> web.Response:
        body = await request.json()
        texts: list[str] = body["input"]
        joined = " ".join(texts)
        if "REJECT" in joined:
            return web.json_response({"error": {"message": "input rejected"}}, status=400)
        if "FAIL_ALWAYS" in joined or ("FAIL_ONCE" in joined and joined not in failed_once):
            failed_once.add(joined)
            return web.json_response({"error": {"message": "overloaded"}}, status=503)
        data = [{"index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(texts))]
        return web.json_response({"data": data, "model": body["model"]})

    app = web.Application()
    app.router.add_post("/embeddings", embed)
    server = await aiohttp_server(app)
    return str(server.make_url("/"))


# -- the two set-ups: what the drill needs to know of the store and the queue ----------------


@dataclass(frozen=True, slots=True)
class QueueState:
    """What is left in the queue: messages not settled, scheduled, and the dead-letter sub-queue."""

    active: int
    scheduled: int
    locked: int
    dead_letters: list[tuple[str, str | None]]  # (message id, reason)


@dataclass
class Rig:
    """A store and queue set-up: the environment of its commands and how to look at both."""

    name: str
    env: dict[str, str]
    store: JobStore
    queue_state: Callable[[], Awaitable[QueueState]]
    delete_shard: Callable[[Shard], Awaitable[None]]


def worker_args(embeddings_url: str) -> list[str]:
    """The worker's flags: the drill's endpoint, and retries fast enough to fit the drill."""
    return [
        "--embedder",
        "openai",
        "--openai-endpoint",
        embeddings_url,
        "--concurrency",
        "4",
        "--max-attempts",
        str(MAX_ATTEMPTS),
        "--backoff-base",
        "0.05",
        "--backoff-max",
        "0.2",
        "--lock-duration",
        str(LOCK_SECONDS),
    ]


@contextlib.asynccontextmanager
async def local_rig(data_dir: Path) -> AsyncIterator[Rig]:
    """The local SQLite queue and the SQLite store, in one file as `embedding-jobs up` uses them."""
    path = data_dir / "embedding-jobs.db"
    env: dict[str, str] = {}
    async with await SQLiteJobStore.open(path) as store, LocalQueue(path) as queue:

        async def queue_state() -> QueueState:
            depth = await queue.depth()
            dead = await queue.peek_dead_letters(max_messages=10 * JOBS)
            with contextlib.closing(sqlite3.connect(path)) as conn:
                (locked,) = conn.execute(
                    "SELECT COUNT(*) FROM queue_messages WHERE state = 'active' AND lock_token IS NOT NULL"
                    " AND visible_at > ?",
                    (time.time(),),
                ).fetchone()
            return QueueState(depth.active, depth.scheduled, locked, [(m.message_id, m.reason) for m in dead])

        async def delete_shard(shard: Shard) -> None:
            with contextlib.closing(sqlite3.connect(path)) as conn, conn:
                deleted = conn.execute(
                    "DELETE FROM shards WHERE tenant_id = ? AND id = ?", (shard.tenant_id, shard.id)
                ).rowcount
            assert deleted == 1

        yield Rig("local queue + SQLite store", env, store, queue_state, delete_shard)


@contextlib.asynccontextmanager
async def servicebus_rig(data_dir: Path, peer: ServiceBusPeer, db: CosmosDatabase) -> AsyncIterator[Rig]:
    """A queue of its own on the Service Bus test peer, and a database of its own on the Cosmos test server."""
    queue_name = f"drill-{uuid.uuid4().hex[:12]}"
    peer.create_queue(queue_name, lock_duration=LOCK_SECONDS)
    env = {
        **cosmos_env(db),
        "EMBEDDING_JOBS_QUEUE": "servicebus",
        "EMBEDDING_JOBS_SERVICEBUS_CONNECTION_STRING": peer.connection_string,
        "EMBEDDING_JOBS_QUEUE_NAME": queue_name,
    }
    done = run_cli(data_dir, "init-db", **env)
    assert done.returncode == 0, done.stderr
    shards = db.client.get_database_client(db.name).get_container_client("shards")
    store = await CosmosJobStore.open(client=db.client, database=db.name)
    try:

        async def queue_state() -> QueueState:
            def read() -> QueueState:
                dead = peer.dead_lettered(queue_name)
                return QueueState(
                    peer.active_count(queue_name),
                    peer.scheduled_count(queue_name),
                    peer.locked_count(queue_name),
                    [(str(m.message_id), m.reason) for m in dead],
                )

            return await asyncio.to_thread(read)

        async def delete_shard(shard: Shard) -> None:
            await shards.delete_item(shard.id, partition_key=shard.tenant_id)

        yield Rig("Service Bus test peer + Cosmos DB test server", env, store, queue_state, delete_shard)
    finally:
        await store.close()


# -- the drill ---------------------------------------------------------------------------------


async def finished(store: JobStore) -> dict[JobStatus, int]:
    """Job counts per status over both tenants, from the counters."""
    totals = dict.fromkeys(JobStatus, 0)
    for tenant in TENANTS:
        for status, count in (await store.stats(tenant)).items():
            totals[status] += count
    return totals


async def all_jobs(store: JobStore) -> dict[str, Job]:
    """Every job record of both tenants, by job id."""
    jobs: dict[str, Job] = {}
    for tenant in TENANTS:
        continuation = None
        while True:
            page = await store.list(tenant, limit=200, continuation=continuation)
            jobs.update({job.id: job for job in page.items})
            continuation = page.continuation
            if continuation is None:
                break
    return jobs


@dataclass
class Worker:
    """One `embedding-jobs worker` process; stderr goes to a file (nobody reads a pipe while it runs)."""

    process: asyncio.subprocess.Process
    log: IO[bytes]

    def tail(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-3000:]


async def start_worker(data_dir: Path, rig: Rig, args: list[str], log: IO[bytes]) -> Worker:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "embedding_jobs",
        "worker",
        *args,
        env=cli_env(data_dir, **rig.env),
        stderr=log,
    )
    return Worker(process, log)


async def wait_for(what: str, condition: Callable[[], Awaitable[bool]], worker: Worker) -> None:
    """Poll condition until true; fail with the worker's log if the deadline passes or the worker dies."""

    async def met() -> bool:
        if await condition():
            return True
        if worker.process.returncode is not None:
            pytest.fail(f"the worker exited ({worker.process.returncode}) before {what}:\n{worker.tail()}")
        return False

    await wait_until(met, what, within=PROGRESS_TIMEOUT, interval=POLL, detail=lambda: "\n" + worker.tail())


@dataclass
class DrillResult:
    """The figures of one drill, printed for docs/reliability.md."""

    rig: str
    sent: int = 0
    kills: int = 0
    in_processing_at_kills: list[int] = field(default_factory=list)
    final: dict[JobStatus, int] = field(default_factory=dict)
    dead_letter_messages: int = 0
    dead_lettered_without_message: int = 0
    ingest_seconds: float = 0.0
    seconds: float = 0.0

    def summary(self) -> str:
        f = {status.value: count for status, count in self.final.items()}
        return (
            f"crash drill [{self.rig}]: sent {self.sent}, SIGKILLs {self.kills} "
            f"(jobs in processing at each: {self.in_processing_at_kills}), final {f}, "
            f"dead-letter queue messages {self.dead_letter_messages} "
            f"(dead-lettered jobs without one: {self.dead_lettered_without_message}), "
            f"{self.seconds:.1f}s ({self.ingest_seconds:.1f}s of it ingest)"
        )


async def drill(rig: Rig, data_dir: Path, embeddings_url: str) -> DrillResult:
    """Ingest the corpus, kill the worker at each kill point and restart it, then run to idle."""
    started = time.monotonic()
    result = DrillResult(rig.name)
    planned = plan()
    corpus = "\n".join(
        json.dumps({"tenantId": p.shard.tenant_id, "shardId": p.shard.id, "text": p.shard.text}) for p in planned
    )
    ingest = run_cli(data_dir, "ingest", "-", stdin=corpus, **rig.env)
    assert ingest.returncode == 0, ingest.stderr
    assert f"{JOBS} shards read, {JOBS} jobs enqueued" in ingest.stderr
    result.sent = JOBS
    result.ingest_seconds = time.monotonic() - started
    # Shards deleted after their job was enqueued: the worker finds nothing to embed.
    for p in planned:
        if p.delete_shard:
            await rig.delete_shard(p.shard)

    args = worker_args(embeddings_url)
    with (data_dir / "workers.log").open("w+b") as log:
        for threshold in KILL_AT:
            worker = await start_worker(data_dir, rig, args, log)

            async def reached(at: int = threshold) -> bool:
                counts = await finished(rig.store)
                return counts[S.COMPLETED] + counts[S.DEAD_LETTERED] >= at

            await wait_for(f"{threshold} jobs finished", reached, worker)
            worker.process.kill()
            assert await worker.process.wait() == -9
            result.kills += 1
            result.in_processing_at_kills.append((await finished(rig.store))[S.PROCESSING])

        worker = await start_worker(data_dir, rig, args, log)

        async def idle() -> bool:
            counts = await finished(rig.store)
            if counts[S.COMPLETED] + counts[S.DEAD_LETTERED] < JOBS:
                return False
            state = await rig.queue_state()
            return state.active == 0 and state.scheduled == 0 and state.locked == 0

        await wait_for("every job to finish and the queue to drain", idle, worker)
        worker.process.terminate()
        assert await asyncio.wait_for(worker.process.wait(), 30) == 0, worker.tail()
    result.seconds = time.monotonic() - started
    assert max(result.in_processing_at_kills) > 0, "no kill interrupted a job; the drill proves nothing"

    # completed + dead_lettered = sent; nothing pending, processing or failed.
    final = await finished(rig.store)
    result.final = final
    expected_dead = sum(p.status is S.DEAD_LETTERED for p in planned)
    assert final == {**dict.fromkeys(JobStatus, 0), S.COMPLETED: JOBS - expected_dead, S.DEAD_LETTERED: expected_dead}
    # Each job ended as its shard's fate says, whatever the kills interrupted.
    jobs = await all_jobs(rig.store)
    assert len(jobs) == JOBS
    wrong = {p.job_id: (jobs[p.job_id].status, p.status) for p in planned if jobs[p.job_id].status is not p.status}
    assert wrong == {}, f"jobs whose final status (left) differs from the planned one (right): {wrong}"
    # Per-tenant counters equal a recount from the job records.
    counters = {tenant: await rig.store.stats(tenant) for tenant in TENANTS}
    assert await rig.store.recount() == counters
    # Every message settled: nothing active, scheduled or locked. Each message in the dead-letter
    # queue belongs to a job planned to be dead-lettered, with the planned reason.
    state = await rig.queue_state()
    assert (state.active, state.scheduled, state.locked) == (0, 0, 0)
    result.dead_letter_messages = len(state.dead_letters)
    dead_reasons: dict[str, set[str | None]] = {}
    for message_id, reason in state.dead_letters:
        dead_reasons.setdefault(message_id.partition(".")[0], set()).add(reason)
    planned_dead = {p.job_id: p.reason for p in planned if p.status is S.DEAD_LETTERED}
    # A kill between a job's dead_lettered record and its message's dead-lettering brings the
    # message back; the worker then dead-letters it as JobDeadLettered.
    wrong_reasons = {
        job_id: reasons
        for job_id, reasons in dead_reasons.items()
        if job_id not in planned_dead or not reasons <= {planned_dead[job_id], REASON_JOB_DEAD_LETTERED}
    }
    assert wrong_reasons == {}, f"dead-letter entries of unplanned jobs, or with odd reasons: {wrong_reasons}"
    result.dead_lettered_without_message = len(set(planned_dead) - set(dead_reasons))
    assert result.dead_lettered_without_message == 0
    print(result.summary())
    return result


async def test_sigkills_during_500_jobs_on_the_local_queue_lose_nothing(tmp_path: Path, embeddings: str) -> None:
    async with local_rig(tmp_path) as rig:
        result = await drill(rig, tmp_path, embeddings)
    assert result.kills == len(KILL_AT)


async def test_sigkills_during_500_jobs_on_service_bus_and_cosmos_lose_nothing(
    tmp_path: Path, embeddings: str, servicebus_peer: ServiceBusPeer, cosmos_db: CosmosDatabase
) -> None:
    async with servicebus_rig(tmp_path, servicebus_peer, cosmos_db) as rig:
        result = await drill(rig, tmp_path, embeddings)
    assert result.kills == len(KILL_AT)
    assert servicebus_peer.errors == []


async def test_a_job_dead_lettered_just_before_a_crash_keeps_its_message_in_the_dead_letter_queue(
    tmp_path: Path,
) -> None:
    # The state a SIGKILL leaves right after the tracker recorded dead_lettered: the record is
    # final and the message, its lock lapsed, is delivered again.
    shard = json.dumps({"tenantId": "acme", "shardId": "s1", "text": "some text"})
    assert run_cli(tmp_path, "ingest", "-", stdin=shard).returncode == 0
    path = tmp_path / "embedding-jobs.db"
    async with await SQLiteJobStore.open(path) as store:
        [job] = (await store.list("acme")).items
        await store.transition("acme", job.id, S.PENDING, S.PROCESSING)
        await store.transition("acme", job.id, S.PROCESSING, S.DEAD_LETTERED, error="PermanentError: rejected")
    done = run_cli(tmp_path, "worker", "--exit-when-idle")
    assert done.returncode == 0, done.stderr
    async with LocalQueue(path) as queue:
        depth = await queue.depth()
        dead = await queue.peek_dead_letters()
    assert (depth.active, depth.scheduled) == (0, 0)
    assert [(m.message_id, m.reason) for m in dead] == [(job.id, REASON_JOB_DEAD_LETTERED)]
    async with await SQLiteJobStore.open(path) as store:
        kept = await store.get("acme", job.id)
    assert (kept.status, kept.error) == (S.DEAD_LETTERED, "PermanentError: rejected")
