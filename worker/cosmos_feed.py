"""The feed of the Cosmos DB shards container: its change feed, with the feeder's state in the leases container.

The feeder's position (the change feed continuation) is the document `<name>:position`, and
the content hash last enqueued for a shard is `<name>:<tenant>:<shard>`, both in the leases
container (partitioned on /id, so each is a point read).
"""

from __future__ import annotations

import logging
from typing import Any, Final, Self, cast

from azure.core.async_paging import AsyncPageIterator
from azure.core.credentials_async import AsyncTokenCredential
from azure.cosmos.aio import ContainerProxy, CosmosClient
from azure.cosmos.exceptions import CosmosResourceNotFoundError

from jobs.cosmos_containers import DEFAULT_LEASES_CONTAINER, leases_container_spec
from jobs.cosmos_setup import CosmosConnection, open_containers, unavailable_errors
from jobs.errors import JobError, StoreUnavailableError
from worker.cosmos_shards import DEFAULT_CONTAINER, DEFAULT_DATABASE, SHARD_TYPE, shard_from_doc, shards_container_spec
from worker.feed import DEFAULT_FEEDER_NAME, ChangePage
from worker.shards import Shard

log = logging.getLogger(__name__)

_UNREAD: Final = object()


class CosmosShardFeed:
    """The shards container's change feed; position and enqueued hashes in the leases container."""

    def __init__(
        self,
        shards: ContainerProxy,
        leases: ContainerProxy,
        *,
        name: str = DEFAULT_FEEDER_NAME,
        connection: CosmosConnection | None = None,
    ) -> None:
        self.shards = shards
        self.leases = leases
        self.name = name
        self._connection = connection
        self._position: object = _UNREAD
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
        shards_container: str = DEFAULT_CONTAINER,
        leases_container: str = DEFAULT_LEASES_CONTAINER,
        name: str = DEFAULT_FEEDER_NAME,
        create_if_missing: bool = False,
    ) -> Self:
        """Open the feed named name on client, or on a client for endpoint."""
        [(shards, _), (leases, _)], connection = await open_containers(
            [shards_container_spec(shards_container), leases_container_spec(leases_container)],
            database=database,
            client=client,
            endpoint=endpoint,
            key=key,
            credential=credential,
            create=create_if_missing,
        )
        return cls(shards, leases, name=name, connection=connection)

    async def close(self) -> None:
        """Close the client if this feed opened it."""
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()

    def _count(self, _response: object) -> None:
        self.round_trips += 1

    async def _lease(self, lease_id: str) -> dict[str, Any] | None:
        try:
            with unavailable_errors("read feeder lease"):
                return dict(
                    await self.leases.read_item(lease_id, partition_key=lease_id, raw_response_hook=self._count)
                )
        except CosmosResourceNotFoundError:
            return None

    async def _put_lease(self, doc: dict[str, Any]) -> None:
        with unavailable_errors("write feeder lease"):
            await self.leases.upsert_item(doc, raw_response_hook=self._count)

    @property
    def _position_id(self) -> str:
        return f"{self.name}:position"

    async def read(self, max_items: int) -> ChangePage:
        """The next page of the change feed after the persisted continuation (from the beginning at first)."""
        if self._position is _UNREAD:
            lease = await self._lease(self._position_id)
            self._position = None if lease is None else lease["continuation"]
        options: dict[str, Any] = {"max_item_count": max_items}
        if isinstance(self._position, str):
            options["continuation"] = self._position
        else:
            options["start_time"] = "Beginning"
        with unavailable_errors("read the change feed"):
            pages = cast(
                AsyncPageIterator[Any],
                self.shards.query_items_change_feed(raw_response_hook=self._count, **options).by_page(),
            )
            try:
                page = await anext(pages)
            except StopAsyncIteration:
                return ChangePage((), None)
            docs = [doc async for doc in page]
            position = pages.continuation_token
        if not docs:
            return ChangePage((), None)
        if not position:
            # Going on without a position would re-read these changes forever: say so instead.
            raise StoreUnavailableError("cosmos: the change feed returned changes without a continuation")
        shards = []
        for doc in docs:
            # Vector documents share the container; only shard documents make jobs.
            if doc.get("type") == SHARD_TYPE:
                try:
                    shards.append(shard_from_doc(doc))
                except (JobError, KeyError) as exc:
                    log.warning("skipping malformed shard %s: %s", doc.get("id"), exc)
        return ChangePage(shards, position)

    def _hash_id(self, tenant_id: str, shard_id: str) -> str:
        return f"{self.name}:{tenant_id}:{shard_id}"

    async def enqueued_hash(self, tenant_id: str, shard_id: str) -> str | None:
        """The hash last enqueued for the shard: a point read in the leases container."""
        lease = await self._lease(self._hash_id(tenant_id, shard_id))
        return None if lease is None else str(lease["contentHash"])

    async def record(self, shard: Shard) -> None:
        """Remember the shard's hash as enqueued."""
        await self._put_lease(
            {
                "id": self._hash_id(shard.tenant_id, shard.id),
                "tenantId": shard.tenant_id,
                "shardId": shard.id,
                "contentHash": shard.content_hash,
            }
        )

    async def advance(self, position: str) -> None:
        """Persist the change feed continuation."""
        await self._put_lease({"id": self._position_id, "continuation": position})
        self._position = position
