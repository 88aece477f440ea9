"""Shards on Cosmos DB: the ShardStore on the shards container (its change feed is worker/cosmos_feed.py).

The shards container is partitioned on /tenantId. A shard is one document
(id = shard id, `type: "shard"`, shardTypeId, text, contentHash, updatedAt).
Its vectors live beside it, not on it: saving vectors then never rewrites the
shard's text (nor re-emits the shard through the change feed), and reading a
shard costs the size of its text only. Vectors are float32 little-endian in
base64 (about 8 KB per 1536-dimension vector), packed into pages of at most
PAGE_BYTES so that no document nears the 2 MB item limit: the manifest
`vectors:<shard id>` carries the first page, further pages are
`vectors:<shard id>:<generation>:<n>`. A save writes the new generation's extra
pages, then the manifest (the switch), then deletes the old generation's pages,
so a reader never mixes two saves. Shard ids cannot contain ':', so these ids
never collide with a shard's.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import uuid
from array import array
from collections.abc import Sequence
from typing import Any, Final, Self, cast

from azure.core.credentials_async import AsyncTokenCredential
from azure.cosmos.aio import ContainerProxy, CosmosClient
from azure.cosmos.exceptions import CosmosResourceNotFoundError

from jobs.cosmos_setup import ContainerSpec, CosmosConnection, open_containers, unavailable_errors
from jobs.errors import JobError, StoreUnavailableError
from jobs.model import format_time, parse_time, validate_id, validate_tenant_id
from worker.shards import Shard, ShardNotFoundError, ShardVectors

SHARD_TYPE: Final = "shard"
VECTORS_TYPE: Final = "vectors"
VECTOR_PAGE_TYPE: Final = "vectorPage"
DEFAULT_DATABASE: Final = "embedding-jobs"
DEFAULT_CONTAINER: Final = "shards"
# Cosmos DB refuses items over 2 MB (system properties included); a page stays well below.
MAX_ITEM_BYTES: Final = 2 * 1024 * 1024 - 16 * 1024
PAGE_BYTES: Final = 1024 * 1024
_READ_ATTEMPTS: Final = 3
# Shards are only read by id and through the change feed: index just the few scalar fields,
# never the text or the vectors, which would make every write expensive.
SHARDS_INDEXING_POLICY: Final = {
    "indexingMode": "consistent",
    "automatic": True,
    "includedPaths": [{"path": "/tenantId/?"}, {"path": "/type/?"}, {"path": "/updatedAt/?"}],
    "excludedPaths": [{"path": "/*"}],
}


def shards_container_spec(name: str) -> ContainerSpec:
    """The shard container: per tenant, scalar fields indexed only."""
    return ContainerSpec(name, "/tenantId", SHARDS_INDEXING_POLICY)


def encode_vector(vector: Sequence[float]) -> str:
    """float32 little-endian, base64."""
    values = array("f", vector)
    if sys.byteorder == "big":
        values.byteswap()
    return base64.b64encode(values.tobytes()).decode("ascii")


def decode_vector(text: str) -> list[float]:
    """The inverse of encode_vector."""
    values = array("f", base64.b64decode(text))
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist()


def paginate(chunks: Sequence[str], vectors: Sequence[Sequence[float]]) -> list[tuple[list[str], list[str]]]:
    """(chunks, encoded vectors) pages of at most PAGE_BYTES each, in order."""
    pages: list[tuple[list[str], list[str]]] = [([], [])]
    size = 0
    for chunk, vector in zip(chunks, vectors, strict=True):
        encoded = encode_vector(vector)
        # json.dumps measures the text as the SDK sends it, escapes included.
        cost = len(json.dumps(chunk)) + len(encoded) + 8
        if cost > PAGE_BYTES:
            raise ValueError(f"one chunk and its vector take {cost} bytes; at most {PAGE_BYTES} fit a document")
        if size + cost > PAGE_BYTES and pages[-1][0]:
            pages.append(([], []))
            size = 0
        pages[-1][0].append(chunk)
        pages[-1][1].append(encoded)
        size += cost
    return pages


def _manifest_id(shard_id: str) -> str:
    return f"vectors:{shard_id}"


def _page_id(shard_id: str, generation: str, n: int) -> str:
    return f"vectors:{shard_id}:{generation}:{n}"


def shard_from_doc(doc: dict[str, Any]) -> Shard:
    """The Shard a shard document holds (JobError or KeyError if malformed)."""
    return Shard(
        tenant_id=doc["tenantId"],
        id=doc["id"],
        shard_type_id=doc["shardTypeId"],
        text=doc["text"],
        content_hash=doc.get("contentHash") or "",
        updated_at=parse_time(doc["updatedAt"]),
    )


class CosmosShardStore:
    """ShardStore on the shards container; vectors in sibling documents."""

    def __init__(self, container: ContainerProxy, *, connection: CosmosConnection | None = None) -> None:
        self.container = container
        self._connection = connection
        self.round_trips = 0

    @classmethod
    async def open(
        cls,
        *,
        endpoint: str = "",
        key: str = "",
        credential: AsyncTokenCredential | None = None,
        client: CosmosClient | None = None,
        database: str = DEFAULT_DATABASE,
        container: str = DEFAULT_CONTAINER,
        create_if_missing: bool = False,
    ) -> Self:
        """Open the store on client, or on a client for endpoint (key, else credential or DefaultAzureCredential)."""
        [(proxy, _)], connection = await open_containers(
            [shards_container_spec(container)],
            database=database,
            client=client,
            endpoint=endpoint,
            key=key,
            credential=credential,
            create=create_if_missing,
        )
        return cls(proxy, connection=connection)

    async def close(self) -> None:
        """Close the client if this store opened it."""
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()

    def _count(self, _response: object) -> None:
        self.round_trips += 1

    async def _read(self, tenant_id: str, item_id: str) -> dict[str, Any] | None:
        try:
            with unavailable_errors(f"read {item_id}"):
                return dict(
                    await self.container.read_item(item_id, partition_key=tenant_id, raw_response_hook=self._count)
                )
        except CosmosResourceNotFoundError:
            return None

    async def _upsert(self, doc: dict[str, Any]) -> None:
        with unavailable_errors(f"write {doc['id']}"):
            await self.container.upsert_item(doc, raw_response_hook=self._count)

    async def put(self, shard: Shard) -> bool:
        """Upsert the shard unless its stored content hash is the same; True when written."""
        doc = {
            "id": shard.id,
            "tenantId": shard.tenant_id,
            "type": SHARD_TYPE,
            "shardTypeId": shard.shard_type_id,
            "text": shard.text,
            "contentHash": shard.content_hash,
            "updatedAt": format_time(shard.updated_at),
        }
        size = len(json.dumps(doc))
        if size > MAX_ITEM_BYTES:
            raise ValueError(f"shard {shard.id} is {size} bytes as a document; Cosmos DB items hold at most 2 MB")
        stored = await self._read(shard.tenant_id, shard.id)
        if stored is not None and stored.get("contentHash") == shard.content_hash:
            return False
        await self._upsert(doc)
        return True

    async def get(self, tenant_id: str, shard_id: str) -> Shard:
        """Point read of the shard; ShardNotFoundError if missing."""
        validate_tenant_id(tenant_id)
        try:
            validate_id(shard_id, "shard id")
        except JobError:
            raise ShardNotFoundError(f"shard {shard_id!r} not found in tenant {tenant_id!r}") from None
        doc = await self._read(tenant_id, shard_id)
        if doc is None or doc.get("type") != SHARD_TYPE:
            raise ShardNotFoundError(f"shard {shard_id!r} not found in tenant {tenant_id!r}")
        return shard_from_doc(doc)

    async def save_vectors(self, tenant_id: str, shard_id: str, vectors: ShardVectors) -> None:
        """Replace the shard's vectors: new pages, then the manifest, then the old pages go."""
        validate_tenant_id(tenant_id)
        pages = paginate(vectors.chunks, vectors.vectors)
        generation = uuid.uuid4().hex[:12]
        old = await self._read(tenant_id, _manifest_id(shard_id))
        for n, (chunks, encoded) in enumerate(pages[1:], start=1):
            await self._upsert(
                {
                    "id": _page_id(shard_id, generation, n),
                    "tenantId": tenant_id,
                    "type": VECTOR_PAGE_TYPE,
                    "shardId": shard_id,
                    "chunks": chunks,
                    "vectors": encoded,
                }
            )
        await self._upsert(
            {
                "id": _manifest_id(shard_id),
                "tenantId": tenant_id,
                "type": VECTORS_TYPE,
                "shardId": shard_id,
                "model": vectors.model,
                "contentHash": vectors.content_hash,
                "generation": generation,
                "pageCount": len(pages),
                "chunks": pages[0][0],
                "vectors": pages[0][1],
            }
        )
        if old is not None:
            for n in range(1, int(old.get("pageCount", 1))):
                try:
                    with unavailable_errors("delete vector page"):
                        await self.container.delete_item(
                            _page_id(shard_id, old["generation"], n),
                            partition_key=tenant_id,
                            raw_response_hook=self._count,
                        )
                except CosmosResourceNotFoundError:
                    pass

    async def get_vectors(self, tenant_id: str, shard_id: str) -> ShardVectors | None:
        """The saved vectors in chunk order, or None before the first save."""
        validate_tenant_id(tenant_id)
        for _ in range(_READ_ATTEMPTS):
            manifest = await self._read(tenant_id, _manifest_id(shard_id))
            if manifest is None:
                return None
            ids = [_page_id(shard_id, manifest["generation"], n) for n in range(1, int(manifest["pageCount"]))]
            extra = await asyncio.gather(*(self._read(tenant_id, page_id) for page_id in ids))
            if any(page is None for page in extra):
                continue  # a newer save replaced these pages between the two reads
            pages = [manifest, *cast(list[dict[str, Any]], extra)]
            return ShardVectors(
                model=manifest["model"],
                content_hash=manifest["contentHash"],
                chunks=[chunk for page in pages for chunk in page["chunks"]],
                vectors=[decode_vector(text) for page in pages for text in page["vectors"]],
            )
        raise StoreUnavailableError(f"the vectors of shard {shard_id} kept changing while being read")
