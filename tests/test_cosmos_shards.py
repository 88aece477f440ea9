"""The Cosmos DB shard store behaves like the SQLite one, and keeps every document under the item limit."""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import CosmosDatabase
from tests.cosmos_server import CosmosServer, cosmos_client
from worker.cosmos_shards import MAX_ITEM_BYTES, PAGE_BYTES, CosmosShardStore, decode_vector, encode_vector
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


@pytest.fixture
async def cosmos_shards(cosmos_db: CosmosDatabase) -> AsyncIterator[CosmosShardStore]:
    store = await CosmosShardStore.open(client=cosmos_db.client, database=cosmos_db.name, create_if_missing=True)
    yield store
    await store.close()


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
        async with cosmos_client(server) as client:
            name = f"test-{uuid.uuid4().hex}"
            cosmos = await CosmosShardStore.open(client=client, database=name, create_if_missing=True)
            yield cosmos
            await cosmos.close()
            await client.delete_database(name)


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


def test_vectors_are_stored_as_base64_float32() -> None:
    vector = [0.5, -1.25, 3.0]
    encoded = encode_vector(vector)
    assert len(encoded) == 16  # 12 bytes in base64
    assert decode_vector(encoded) == vector


async def test_large_vector_sets_are_split_into_documents_under_the_item_limit(
    cosmos_shards: CosmosShardStore,
) -> None:
    await cosmos_shards.put(shard())
    # 300 vectors of 1536 float32 dimensions: about 2.4 MB, more than one item may hold.
    large = vectors_of(300, 1536)
    await cosmos_shards.save_vectors("tenant-a", "shard-1", large)

    docs = [
        doc
        async for doc in cosmos_shards.container.query_items(
            "SELECT * FROM c WHERE c.tenantId = @tenant AND c.shardId = @shard",
            parameters=[{"name": "@tenant", "value": "tenant-a"}, {"name": "@shard", "value": "shard-1"}],
            partition_key="tenant-a",
        )
    ]
    assert len(docs) == 3
    assert all(len(json.dumps(doc)) < min(MAX_ITEM_BYTES, PAGE_BYTES + 4096) for doc in docs)
    saved = await cosmos_shards.get_vectors("tenant-a", "shard-1")
    assert saved is not None
    assert list(saved.chunks) == list(large.chunks)
    assert list(saved.vectors) == list(large.vectors)

    # A smaller save replaces every page of the larger one.
    await cosmos_shards.save_vectors("tenant-a", "shard-1", vectors_of(2, 1536, seed=3))
    left = [
        doc["id"]
        async for doc in cosmos_shards.container.query_items(
            "SELECT c.id FROM c WHERE c.tenantId = @tenant AND c.shardId = @shard",
            parameters=[{"name": "@tenant", "value": "tenant-a"}, {"name": "@shard", "value": "shard-1"}],
            partition_key="tenant-a",
        )
    ]
    assert left == ["vectors:shard-1"]


async def test_a_shard_too_large_for_one_item_is_refused(cosmos_shards: CosmosShardStore) -> None:
    with pytest.raises(ValueError, match="at most 2 MB"):
        await cosmos_shards.put(shard("x" * (2 * 1024 * 1024)))


async def test_saving_vectors_never_rewrites_the_shard_document(cosmos_shards: CosmosShardStore) -> None:
    await cosmos_shards.put(shard())
    before = await cosmos_shards.container.read_item("shard-1", partition_key="tenant-a")
    await cosmos_shards.save_vectors("tenant-a", "shard-1", vectors_of(2, 4))
    after = await cosmos_shards.container.read_item("shard-1", partition_key="tenant-a")
    assert after["_etag"] == before["_etag"]
