"""Builds the store, shard store, shard feed, queue and embedder that the settings name."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from jobs.errors import StoreUnavailableError
from jobs.lease import Lease, LeaseBackend
from jobs.settings import Settings
from jobs.sqlite_lease import SQLiteLeaseBackend
from jobs.sqlite_store import SQLiteJobStore
from jobs.store import JobStore
from worker.consumer import ConsumerConfig
from worker.embedders import Embedder, create_embedder
from worker.feed import DEFAULT_FEEDER_NAME, ShardFeed
from worker.local_queue import LocalQueue
from worker.queue import Queue
from worker.shards import ShardStore, SQLiteShardStore
from worker.spool import SPOOL_DIR, Spool
from worker.tracker import JobTracker

if TYPE_CHECKING:
    from azure.cosmos.aio import CosmosClient

log = logging.getLogger(__name__)


class BackendUnavailableError(RuntimeError):
    """The configured backend cannot be used in this installation."""


@dataclass(frozen=True, slots=True)
class Backends:
    """Open connections to everything a command needs."""

    store: JobStore
    shards: ShardStore
    queue: Queue
    state_lease: Lease | None = None
    feed: ShardFeed | None = None


async def open_job_store(settings: Settings, client: CosmosClient | None = None, *, verify: bool = True) -> JobStore:
    """The job store of settings.store (on client, when given, for Cosmos); verify=False: see CosmosJobStore.open."""
    if settings.store == "sqlite":
        return await SQLiteJobStore.open(settings.sqlite_path)
    if settings.store == "cosmos":
        from embedding_jobs.cosmos import retention_of
        from jobs.cosmos_store import CosmosJobStore

        _require_cosmos(settings)
        return await CosmosJobStore.open(
            endpoint=settings.cosmos_endpoint,
            key=settings.cosmos_key,
            client=client,
            database=settings.cosmos_database,
            container=settings.cosmos_container,
            retention=retention_of(settings),
            verify=verify,
        )
    raise BackendUnavailableError(f"store backend {settings.store!r} is not available in this installation")


async def open_worker_job_store(settings: Settings, client: CosmosClient | None = None) -> JobStore:
    """The job store for a worker, which starts even while a Cosmos job container does not answer.

    The tracker bounds, buffers and spools every job-status write until the store answers, so
    an outage at start delays the records but must not keep the worker from embedding. (On
    SQLite the store is the same file as the queue: without it there is no work either.)
    """
    if settings.store != "cosmos":
        return await open_job_store(settings, client)
    try:
        return await asyncio.wait_for(open_job_store(settings, client), settings.store_timeout)
    except (StoreUnavailableError, TimeoutError) as exc:
        reason = str(exc) or f"no answer within {settings.store_timeout:g}s"
        log.warning("job store unavailable at start (%s); working on, job-status writes wait in the spool", reason)
        return await open_job_store(settings, client, verify=False)


async def open_shard_store(settings: Settings, client: CosmosClient | None = None) -> ShardStore:
    """The shard store that goes with settings.store."""
    if settings.store == "sqlite":
        return await SQLiteShardStore.open(settings.sqlite_path)
    if settings.store == "cosmos":
        from worker.cosmos_shards import CosmosShardStore

        _require_cosmos(settings)
        return await CosmosShardStore.open(
            endpoint=settings.cosmos_endpoint,
            key=settings.cosmos_key,
            client=client,
            database=settings.cosmos_database,
            container=settings.cosmos_shards_container,
        )
    raise BackendUnavailableError(f"shard store for {settings.store!r} is not available in this installation")


async def open_feed(
    settings: Settings, client: CosmosClient | None = None, *, name: str = DEFAULT_FEEDER_NAME
) -> ShardFeed:
    """The feed of the shard store that goes with settings.store (on client, when given, for Cosmos)."""
    if settings.store == "sqlite":
        from worker.local_feed import LocalShardFeed

        return await LocalShardFeed.open(settings.sqlite_path, name=name)
    if settings.store == "cosmos":
        from worker.cosmos_feed import CosmosShardFeed

        _require_cosmos(settings)
        return await CosmosShardFeed.open(
            endpoint=settings.cosmos_endpoint,
            key=settings.cosmos_key,
            client=client,
            database=settings.cosmos_database,
            shards_container=settings.cosmos_shards_container,
            leases_container=settings.cosmos_leases_container,
            name=name,
        )
    raise BackendUnavailableError(f"shard feed for {settings.store!r} is not available in this installation")


async def open_state_lease(settings: Settings, client: CosmosClient | None = None) -> Lease:
    """The lease exporters on the store of settings.store elect their one state reader with."""
    backend: LeaseBackend
    if settings.store == "sqlite":
        backend = await SQLiteLeaseBackend.open(settings.sqlite_path)
    elif settings.store == "cosmos":
        from jobs.cosmos_lease import CosmosLeaseBackend

        _require_cosmos(settings)
        backend = await CosmosLeaseBackend.open(
            endpoint=settings.cosmos_endpoint,
            key=settings.cosmos_key,
            client=client,
            database=settings.cosmos_database,
            container=settings.cosmos_leases_container,
        )
    else:
        raise BackendUnavailableError(f"no state lease for store {settings.store!r} in this installation")
    # One refresh interval: a dead leader is then replaced within 1.5 intervals (exporter/leader.py).
    return Lease(backend, duration=settings.refresh_interval)


def _require_cosmos(settings: Settings) -> None:
    if not settings.cosmos_endpoint:
        raise ValueError("the cosmos store needs --cosmos-endpoint (EMBEDDING_JOBS_COSMOS_ENDPOINT)")


async def open_queue(settings: Settings) -> Queue:
    """The queue of settings.queue."""
    if settings.queue == "local":
        return await LocalQueue(
            settings.sqlite_path,
            settings.queue_name,
            lock_duration=settings.lock_duration,
            max_delivery_count=settings.max_delivery_count,
        ).open()
    if settings.queue == "servicebus":
        from worker.servicebus_queue import ServiceBusQueue

        if settings.servicebus_connection_string:
            queue = ServiceBusQueue.from_connection_string(settings.servicebus_connection_string, settings.queue_name)
        elif settings.servicebus_namespace:
            from azure.identity.aio import DefaultAzureCredential

            queue = ServiceBusQueue.from_namespace(
                settings.servicebus_namespace, DefaultAzureCredential(), settings.queue_name
            )
        else:
            raise ValueError(
                "the servicebus queue needs --servicebus-connection-string or --servicebus-namespace "
                "(EMBEDDING_JOBS_SERVICEBUS_CONNECTION_STRING / EMBEDDING_JOBS_SERVICEBUS_NAMESPACE)"
            )
        return await queue.open()
    raise BackendUnavailableError(f"queue backend {settings.queue!r} is not available in this installation")


def build_embedder(settings: Settings) -> Embedder:
    """The embedder of settings.embedder."""
    if settings.embedder == "hashing":
        return create_embedder("hashing", dimensions=settings.embedding_dimensions)
    if settings.embedder == "openai":
        if not settings.openai_endpoint:
            raise ValueError("the openai embedder needs --openai-endpoint (EMBEDDING_JOBS_OPENAI_ENDPOINT)")
        return create_embedder(
            "openai",
            base_url=settings.openai_endpoint,
            api_key=settings.openai_api_key or None,
            model=settings.openai_model,
            api_version=settings.openai_api_version or None,
            batch_size=settings.openai_batch_size,
            timeout=settings.openai_timeout,
        )
    return create_embedder("sentence-transformers")


def consumer_config(settings: Settings) -> ConsumerConfig:
    """The consume loop's part of the settings."""
    return ConsumerConfig(
        concurrency=settings.concurrency,
        max_attempts=settings.max_attempts,
        backoff_base=settings.backoff_base,
        backoff_max=settings.backoff_max,
        chunk_max_tokens=settings.chunk_max_tokens,
        chunk_overlap_tokens=settings.chunk_overlap_tokens,
        drain_timeout=settings.drain_timeout,
        messaging_system="servicebus" if settings.queue == "servicebus" else "sqlite",
        heartbeat_file=Path(settings.heartbeat_file) if settings.heartbeat_file else None,
    )


def build_tracker(settings: Settings, store: JobStore) -> JobTracker:
    """The worker's job tracker: store calls bounded by store_timeout, buffered writes spooled under data_dir.

    Opening the spool adopts the writes left by workers that died on the same data directory.
    """
    directory = settings.data_dir / SPOOL_DIR
    try:
        spool = Spool.open(directory)
    except OSError as exc:
        raise ValueError(f"cannot keep the tracking spool in {directory} (--data-dir): {exc}") from exc
    return JobTracker(store, buffer_size=settings.tracking_buffer, timeout=settings.store_timeout, spool=spool)


@asynccontextmanager
async def open_backends(
    settings: Settings, *, state_lease: bool = False, for_worker: bool = False, feed: bool = False
) -> AsyncIterator[Backends]:
    """Open store, shard store and queue (and the state lease and shard feed if asked for); close them all on exit.

    for_worker opens the job store with open_worker_job_store.
    """
    async with AsyncExitStack() as stack:
        client = None
        if settings.store == "cosmos":
            from embedding_jobs.cosmos import connect_from

            _require_cosmos(settings)
            # One client (one connection pool) shared by the stores, the lease and the feed.
            connection = await connect_from(settings)
            stack.push_async_callback(connection.close)
            client = connection.client
        store = await (open_worker_job_store if for_worker else open_job_store)(settings, client)
        stack.push_async_callback(store.close)
        shards = await open_shard_store(settings, client)
        stack.push_async_callback(shards.close)
        queue = await open_queue(settings)
        stack.push_async_callback(queue.close)
        lease = None
        if state_lease:
            lease = await open_state_lease(settings, client)
            stack.push_async_callback(lease.close)
        shard_feed = None
        if feed:
            shard_feed = await open_feed(settings, client)
            stack.push_async_callback(shard_feed.close)
        yield Backends(store=store, shards=shards, queue=queue, state_lease=lease, feed=shard_feed)
