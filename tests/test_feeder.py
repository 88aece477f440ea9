"""The feeder turns new and changed shards into jobs exactly once, on the local file and on Cosmos DB."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, closing
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider

from embedding_jobs.backends import open_feed
from embedding_jobs.cosmos import init_db
from jobs.model import JobStatus, format_time, utcnow
from jobs.settings import Settings
from jobs.sqlite_store import SQLiteJobStore
from tests.components import wait_until
from tests.cosmos_server import CosmosServer, cosmos_database
from worker.cosmos_feed import CosmosShardFeed
from worker.cosmos_shards import CosmosShardStore
from worker.feed import ShardFeed
from worker.feeder import Feeder, run_feeder
from worker.local_feed import LocalShardFeed
from worker.local_queue import LocalQueue
from worker.producer import Producer, job_id_for
from worker.queue import QueueUnavailableError
from worker.shards import Shard, ShardStore, ShardVectors, SQLiteShardStore
from worker.tracing import get_tracer

TEXT = "Embedding pipelines turn text into vectors."


def shard(shard_id: str = "shard-1", text: str = TEXT) -> Shard:
    return Shard(tenant_id="tenant-a", id=shard_id, shard_type_id="document", text=text)


class FlakyQueue(LocalQueue):
    """A local queue whose sends start failing once `sends_left` reaches zero."""

    sends_left: int | None = None

    async def send(
        self,
        body: bytes,
        *,
        message_id: str,
        application_properties: Mapping[str, str] | None = None,
        scheduled_enqueue_time: datetime | None = None,
    ) -> int:
        if self.sends_left is not None:
            if self.sends_left == 0:
                raise QueueUnavailableError("injected outage")
            self.sends_left -= 1
        return await super().send(
            body,
            message_id=message_id,
            application_properties=application_properties,
            scheduled_enqueue_time=scheduled_enqueue_time,
        )


@dataclass
class Env:
    """A shard store, a way to (re)open the feeder on it, and the job store and queue it feeds."""

    backend: str
    shards: ShardStore
    open_feed: Callable[[], Awaitable[ShardFeed]]
    resave: Callable[[Shard], Awaitable[None]]
    store: SQLiteJobStore
    queue: FlakyQueue
    producer: Producer
    settings: Settings
    feeds: list[ShardFeed] = field(default_factory=list)

    async def feeder(self) -> Feeder:
        """A feeder as a freshly started process would build it."""
        feed = await self.open_feed()
        self.feeds.append(feed)
        return Feeder(feed, self.producer, page_size=2)

    async def messages(self) -> list[dict[str, object]]:
        received = await self.queue.receive(max_messages=100, max_wait=0)
        for message in received:
            await self.queue.abandon(message)
        return sorted((json.loads(m.body) for m in received), key=lambda body: str(body["jobId"]))


@pytest.fixture(params=["local", "cosmos"])
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    db = tmp_path / "embedding-jobs.db"
    async with AsyncExitStack() as stack:
        store = await SQLiteJobStore.open(db)
        stack.push_async_callback(store.close)
        queue = await FlakyQueue(db).open()
        stack.push_async_callback(queue.close)
        provider = TracerProvider()
        stack.callback(provider.shutdown)
        producer = Producer(store, queue, get_tracer(provider))
        settings = Settings(data_dir=tmp_path)
        if request.param == "local":
            shards: ShardStore = await SQLiteShardStore.open(db)
            stack.push_async_callback(shards.close)

            async def open_local() -> ShardFeed:
                return await LocalShardFeed.open(db)

            async def resave_local(s: Shard) -> None:
                # Another writer stores the same text again: the row changes, the content does not.
                with closing(sqlite3.connect(db)) as conn, conn:
                    conn.execute(
                        "UPDATE shards SET text = ?, updated_at = ? WHERE tenant_id = ? AND id = ?",
                        (s.text, format_time(utcnow()), s.tenant_id, s.id),
                    )

            yield Env("local", shards, open_local, resave_local, store, queue, producer, settings)
        else:
            # Looked up, not declared, so local runs never start the server.
            server: CosmosServer = request.getfixturevalue("cosmos_server")
            database = await stack.enter_async_context(cosmos_database(server))
            client, name = database.client, database.name
            await init_db(client, name, "embedding-jobs", "shards", "leases", retention=None)
            cosmos_shards = await CosmosShardStore.open(client=client, database=name)

            async def open_cosmos() -> ShardFeed:
                return await CosmosShardFeed.open(client=client, database=name)

            async def resave_cosmos(s: Shard) -> None:
                doc = await cosmos_shards.container.read_item(s.id, partition_key=s.tenant_id)
                await cosmos_shards.container.upsert_item({**doc, "updatedAt": format_time(utcnow())})

            settings = Settings(
                store="cosmos", cosmos_endpoint=server.endpoint, cosmos_key=server.key, cosmos_database=name
            )
            yield Env("cosmos", cosmos_shards, open_cosmos, resave_cosmos, store, queue, producer, settings)


@pytest.fixture(autouse=True)
async def close_feeds(env: Env) -> AsyncIterator[None]:
    yield
    for feed in env.feeds:
        await feed.close()


async def test_a_new_shard_becomes_one_pending_job_and_one_message(env: Env) -> None:
    await env.shards.put(shard())
    feeder = await env.feeder()

    result = await feeder.poll()

    assert (result.enqueued, result.unchanged) == (1, 0)
    job_id = job_id_for(shard())
    assert (await env.store.get("tenant-a", job_id)).shard_id == "shard-1"
    assert await env.messages() == [
        {"jobId": job_id, "tenantId": "tenant-a", "shardId": "shard-1", "shardTypeId": "document"}
    ]
    assert (await feeder.poll()).enqueued == 0


async def test_an_unchanged_resave_enqueues_nothing(env: Env) -> None:
    await env.shards.put(shard())
    feeder = await env.feeder()
    await feeder.poll()

    await env.resave(shard())
    assert await env.shards.put(shard()) is False
    result = await feeder.poll()

    assert (result.enqueued, result.unchanged) == (0, 1)
    assert len(await env.messages()) == 1


async def test_a_changed_shard_enqueues_a_new_job(env: Env) -> None:
    await env.shards.put(shard())
    feeder = await env.feeder()
    await feeder.poll()

    changed = shard(text=TEXT + " Now longer.")
    await env.shards.put(changed)
    assert (await feeder.poll()).enqueued == 1

    assert [m["jobId"] for m in await env.messages()] == sorted([job_id_for(shard()), job_id_for(changed)])
    assert (await env.store.stats("tenant-a"))[JobStatus.PENDING] == 2


async def test_content_changed_back_is_enqueued_again(env: Env) -> None:
    feeder = await env.feeder()
    for text in (TEXT, TEXT + " B", TEXT):
        await env.shards.put(shard(text=text))
        assert (await feeder.poll()).enqueued == 1


async def test_a_restart_resumes_after_the_last_page_without_repeats(env: Env) -> None:
    for n in range(3):
        await env.shards.put(shard(f"shard-{n}"))
    first = await env.feeder()
    assert (await first.poll()).enqueued == 3

    await env.shards.put(shard("shard-3"))
    await env.shards.put(shard("shard-0", TEXT + " Edited."))
    restarted = await env.feeder()
    result = await restarted.poll()

    assert (result.enqueued, result.unchanged) == (2, 0)
    assert len(await env.messages()) == 5
    assert (await (await env.feeder()).poll()).enqueued == 0


async def test_a_failure_inside_a_page_neither_loses_nor_repeats_jobs(env: Env) -> None:
    await env.shards.put(shard("shard-1"))
    feeder = await env.feeder()
    await feeder.poll()
    await env.shards.put(shard("shard-2"))
    await env.shards.put(shard("shard-1", TEXT + " Edited."))
    env.queue.sends_left = 1  # the page's first shard goes out, the second fails
    with pytest.raises(QueueUnavailableError):
        await feeder.poll()
    env.queue.sends_left = None

    result = await (await env.feeder()).poll()

    assert (result.enqueued, result.unchanged) == (1, 1)
    assert len(await env.messages()) == 3


async def test_saving_vectors_makes_no_job(env: Env) -> None:
    await env.shards.put(shard())
    feeder = await env.feeder()
    await feeder.poll()
    vectors = ShardVectors(model="m", content_hash=shard().content_hash, chunks=["c"], vectors=[[0.5, 0.25]])
    await env.shards.save_vectors("tenant-a", "shard-1", vectors)

    result = await feeder.poll()

    assert (result.enqueued, result.unchanged) == (0, 0)
    assert len(await env.messages()) == 1


async def test_run_feeder_follows_the_configured_store_until_stopped(env: Env) -> None:
    feed = await open_feed(env.settings)
    env.feeds.append(feed)
    stop = asyncio.Event()
    task = asyncio.create_task(run_feeder(feed, env.producer, stop, interval=0.02))
    try:
        await env.shards.put(shard())

        async def enqueued() -> bool:
            return bool(await env.messages())

        await wait_until(enqueued, "the feeder to enqueue the shard", within=10)
    finally:
        stop.set()
        totals = await task
    assert totals.enqueued == 1
