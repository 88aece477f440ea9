"""The ShardStore contract (worker/shards.py), held on every backend: SQLite and Cosmos DB."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.cosmos_server import CosmosServer, cosmos_database
from worker.cosmos_shards import CosmosShardStore
from worker.shards import Shard, ShardNotFoundError, ShardStore, ShardVectors, SQLiteShardStore

TEXT = "Embedding pipelines turn text into vectors."


def shard(text: str = TEXT, shard_id: str = "shard-1", tenant: str = "tenant-a") -> Shard:
    return Shard(tenant_id=tenant, id=shard_id, shard_type_id="document", text=text)


def vectors_of(count: int, dimensions: int, content_hash: str = "h1", seed: int = 1) -> ShardVectors:
    rng = random.Random(seed)
    # Values exactly representable in float32, so a round trip compares equal.
    vectors = [[rng.randrange(-(2**20), 2**20) / 2**20 for _ in range(dimensions)] for _ in range(count)]
    return ShardVectors(
        model="test-model", content_hash=content_hash, chunks=[f"chunk {i}" for i in range(count)], vectors=vectors
    )


@pytest.fixture(params=["sqlite", "cosmos"])
async def shards(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ShardStore]:
    """A fresh shard store of each backend."""
    if request.param == "sqlite":
        sqlite = await SQLiteShardStore.open(tmp_path / "shards.db")
        yield sqlite
        await sqlite.close()
    else:
        # The server is looked up (not declared) so that sqlite runs never start it.
        server: CosmosServer = request.getfixturevalue("cosmos_server")
        async with cosmos_database(server) as db:
            cosmos = await CosmosShardStore.open(client=db.client, database=db.name, create_if_missing=True)
            try:
                yield cosmos
            finally:
                await cosmos.close()


async def test_put_reports_new_and_changed_content_only(shards: ShardStore) -> None:
    assert await shards.put(shard()) is True
    assert await shards.put(shard()) is False
    assert await shards.put(shard(TEXT + " Changed.")) is True
    stored = await shards.get("tenant-a", "shard-1")
    assert stored.text == TEXT + " Changed."
    assert stored.content_hash == shard(TEXT + " Changed.").content_hash


async def test_missing_shard_raises_not_found(shards: ShardStore) -> None:
    await shards.put(shard(tenant="tenant-b"))
    with pytest.raises(ShardNotFoundError):
        await shards.get("tenant-a", "shard-1")
    with pytest.raises(ShardNotFoundError):
        await shards.get("tenant-a", "no-such-shard")


async def test_vectors_round_trip_and_are_replaced_by_the_next_save(shards: ShardStore) -> None:
    await shards.put(shard())
    assert await shards.get_vectors("tenant-a", "shard-1") is None
    first = vectors_of(3, 8)
    await shards.save_vectors("tenant-a", "shard-1", first)
    assert await shards.get_vectors("tenant-a", "shard-1") == ShardVectors(
        model=first.model, content_hash=first.content_hash, chunks=list(first.chunks), vectors=list(first.vectors)
    )
    second = vectors_of(1, 8, content_hash="h2", seed=2)
    await shards.save_vectors("tenant-a", "shard-1", second)
    saved = await shards.get_vectors("tenant-a", "shard-1")
    assert saved is not None
    assert (saved.content_hash, list(saved.chunks), list(saved.vectors)) == ("h2", ["chunk 0"], second.vectors)


async def test_shards_and_vectors_are_scoped_by_tenant(shards: ShardStore) -> None:
    await shards.put(shard(tenant="tenant-a"))
    await shards.put(shard(TEXT + " Other.", tenant="tenant-b"))
    await shards.save_vectors("tenant-a", "shard-1", vectors_of(2, 4))

    assert (await shards.get("tenant-b", "shard-1")).text == TEXT + " Other."
    assert await shards.get_vectors("tenant-b", "shard-1") is None
    assert await shards.get_vectors("tenant-a", "shard-1") is not None
