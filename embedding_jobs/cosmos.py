"""Cosmos DB from the settings: the account connection, the job retention, and what `init-db` sets up.

The containers are the job store's and the leases' (jobs/cosmos_containers.py) and the shard
store's (worker/cosmos_shards.py); this is the one place that knows all of them and their
configured names.
"""

from __future__ import annotations

from datetime import timedelta

from azure.cosmos.aio import CosmosClient

from jobs.cosmos_containers import jobs_container_spec, leases_container_spec
from jobs.cosmos_setup import CosmosConnection, connect, ensure_container, ensure_database
from jobs.settings import Settings
from worker.cosmos_shards import shards_container_spec


async def init_db(
    client: CosmosClient,
    database: str,
    jobs_container: str,
    shards_container: str,
    leases_container: str,
    *,
    retention: timedelta | None,
) -> list[str]:
    """Create the database and the job, shard and lease containers if missing; say what was done."""
    db, line = await ensure_database(client, database)
    lines = [line]
    for spec in (
        jobs_container_spec(jobs_container, retention),
        shards_container_spec(shards_container),
        leases_container_spec(leases_container),
    ):
        _, line = await ensure_container(db, spec)
        lines.append(line)
    return lines


def retention_of(settings: Settings) -> timedelta | None:
    """settings.retention_hours as a timedelta, None when finished jobs are kept."""
    return timedelta(hours=settings.retention_hours) if settings.retention_hours > 0 else None


async def connect_from(settings: Settings) -> CosmosConnection:
    """A connection to the account the settings name."""
    return await connect(settings.cosmos_endpoint, settings.cosmos_key)


async def run_init_db(settings: Settings) -> list[str]:
    """`embedding-jobs init-db`: set up the database and containers the settings name."""
    connection = await connect_from(settings)
    try:
        return await init_db(
            connection.client,
            settings.cosmos_database,
            settings.cosmos_container,
            settings.cosmos_shards_container,
            settings.cosmos_leases_container,
            retention=retention_of(settings),
        )
    finally:
        await connection.close()
