"""The Cosmos DB shard store keeps every document under the item limit.

What every shard store does is held on both backends by tests/test_shard_store_contract.py.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator

import pytest

from tests.conftest import CosmosDatabase
from worker.cosmos_shards import MAX_ITEM_BYTES, PAGE_BYTES, CosmosShardStore, decode_vector, encode_vector
from worker.shards import Shard, ShardVectors

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
