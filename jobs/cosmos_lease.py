"""Leases as documents in the Cosmos DB leases container (partitioned on /id), swapped by etag."""

from __future__ import annotations

from typing import Any, Final, Self

from azure.core import MatchConditions
from azure.core.credentials_async import AsyncTokenCredential
from azure.cosmos.aio import ContainerProxy, CosmosClient
from azure.cosmos.exceptions import (
    CosmosAccessConditionFailedError,
    CosmosResourceExistsError,
    CosmosResourceNotFoundError,
)

from jobs.cosmos_containers import DEFAULT_LEASES_CONTAINER, leases_container_spec
from jobs.cosmos_setup import CosmosConnection, open_containers, unavailable_errors
from jobs.lease import LeaseRecord
from jobs.model import format_time, parse_time, utcnow

LEASE_TYPE: Final = "lease"


def _record(doc: dict[str, Any]) -> LeaseRecord:
    return LeaseRecord(
        name=str(doc["id"]),
        holder=str(doc["holder"]),
        version=str(doc["_etag"]),
        duration=float(doc["leaseDurationSeconds"]),
        renewed_at=parse_time(str(doc["renewedAt"])),
    )


class CosmosLeaseBackend:
    """LeaseBackend on the leases container: create (409: taken) or replace if the etag still matches (412)."""

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
        database: str,
        container: str = DEFAULT_LEASES_CONTAINER,
        create_if_missing: bool = False,
    ) -> Self:
        """Open the leases container on client, or on a client for endpoint."""
        [(proxy, _)], connection = await open_containers(
            [leases_container_spec(container)],
            database=database,
            client=client,
            endpoint=endpoint,
            key=key,
            credential=credential,
            create=create_if_missing,
        )
        return cls(proxy, connection=connection)

    def _count(self, _response: object) -> None:
        self.round_trips += 1

    async def read(self, name: str) -> LeaseRecord | None:
        """The record (a point read), or None when it was never written."""
        with unavailable_errors(f"read lease {name}"):
            try:
                doc = await self.container.read_item(name, partition_key=name, raw_response_hook=self._count)
            except CosmosResourceNotFoundError:
                return None
        return _record(dict(doc))

    async def write(self, name: str, expected: str | None, holder: str, duration: float) -> LeaseRecord | None:
        """Write holder if the document is still at etag expected (None: not there yet); None if not."""
        body = {
            "id": name,
            "type": LEASE_TYPE,
            "holder": holder,
            "leaseDurationSeconds": duration,
            "renewedAt": format_time(utcnow()),
        }
        with unavailable_errors(f"write lease {name}"):
            try:
                if expected is None:
                    doc = await self.container.create_item(body, raw_response_hook=self._count)
                else:
                    doc = await self.container.replace_item(
                        name,
                        body,
                        etag=expected,
                        match_condition=MatchConditions.IfNotModified,
                        raw_response_hook=self._count,
                    )
            except (CosmosResourceExistsError, CosmosAccessConditionFailedError, CosmosResourceNotFoundError):
                # 409: someone created it first; 412: someone wrote since we read; 404: deleted since.
                return None
        return _record(dict(doc))

    async def close(self) -> None:
        """Close the client if this backend opened it."""
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()
