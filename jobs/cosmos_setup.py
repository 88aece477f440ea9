"""Cosmos DB plumbing shared by the Cosmos stores: clients, error mapping, database and containers.

Clients come from `connect`: an account key, or else Microsoft Entra ID
(DefaultAzureCredential), with the SDK's retry options for throttling set
explicitly (see THROTTLE_RETRIES). `ensure_container` creates a container as its
ContainerSpec says, or brings it up to it; `open_containers` is how every Cosmos
store opens its containers, on a shared client or on a connection of its own.
Which containers exist is said by their specs (jobs/cosmos_containers.py and the
shard store's); `embedding-jobs init-db` creates them all.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final

from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.cosmos import PartitionKey
from azure.cosmos.aio import ContainerProxy, CosmosClient, DatabaseProxy
from azure.cosmos.exceptions import (
    CosmosClientTimeoutError,
    CosmosHttpResponseError,
    CosmosResourceExistsError,
    CosmosResourceNotFoundError,
)

from jobs.errors import StoreUnavailableError

# A throttled (429) request was not executed, so the SDK retries it, reads or writes alike,
# waiting as long as the service's retry-after asks. These are the SDK defaults, set here
# so they are visible and tested: 9 retries within 30 s, then StoreUnavailableError.
THROTTLE_RETRIES: Final = 9
THROTTLE_MAX_WAIT_SECONDS: Final = 30

# Statuses that mean "the service cannot serve this now"; the caller may try again later.
# 401/403 are here too: a store we may not use is unavailable until the credential is fixed.
_UNAVAILABLE_STATUS: Final = frozenset({401, 403, 408, 429, 449})

ASC: Final = "ascending"
DESC: Final = "descending"


@dataclass(frozen=True, slots=True)
class ContainerSpec:
    """How one container must be set up."""

    name: str
    partition_key: str
    indexing_policy: Mapping[str, Any] | None = None
    default_ttl: int | None = None

    @property
    def composite_indexes(self) -> list[list[dict[str, str]]]:
        return list((self.indexing_policy or {}).get("compositeIndexes", []))


def is_unavailable(exc: BaseException) -> bool:
    """True for errors that mean the service could not serve the request now (network, timeout, 5xx...)."""
    if isinstance(exc, ServiceRequestError | ServiceResponseError | CosmosClientTimeoutError):
        return True
    if isinstance(exc, ClientAuthenticationError) and not isinstance(exc, CosmosHttpResponseError):
        return True  # the credential could not get a token
    if isinstance(exc, CosmosHttpResponseError):
        status = exc.status_code or 0
        return status >= 500 or status in _UNAVAILABLE_STATUS
    return False


def describe(exc: BaseException) -> str:
    """A one-line summary of an SDK error (its messages run to several lines of JSON)."""
    status = getattr(exc, "status_code", None)
    text = (getattr(exc, "message", None) or str(exc)).strip().splitlines()
    first = text[0][:300] if text else ""
    return f"{type(exc).__name__}{f' {status}' if status else ''}: {first}"


@contextmanager
def unavailable_errors(what: str) -> Iterator[None]:
    """Turn the SDK's transient errors inside the block into StoreUnavailableError."""
    try:
        yield
    except AzureError as exc:
        if is_unavailable(exc):
            raise StoreUnavailableError(f"cosmos: {what}: {describe(exc)}") from exc
        raise


@dataclass(slots=True)
class CosmosConnection:
    """An open client, and the credential created for it (closed together)."""

    client: CosmosClient
    credential: AsyncTokenCredential | None = None

    async def close(self) -> None:
        """Close the client and any credential made for it."""
        try:
            await self.client.close()
        finally:
            if self.credential is not None:
                await self.credential.close()


async def connect(
    endpoint: str, key: str = "", *, credential: AsyncTokenCredential | None = None, **client_options: Any
) -> CosmosConnection:
    """Open a client authenticated by key, else credential, else DefaultAzureCredential.

    StoreUnavailableError when the account cannot be reached.
    """
    if not endpoint:
        raise ValueError("set the Cosmos DB endpoint (--cosmos-endpoint or EMBEDDING_JOBS_COSMOS_ENDPOINT)")
    owned: AsyncTokenCredential | None = None
    auth: str | AsyncTokenCredential
    if key:
        auth = key
    elif credential is not None:
        auth = credential
    else:
        from azure.identity.aio import DefaultAzureCredential

        auth = owned = DefaultAzureCredential()
    options: dict[str, Any] = {
        "retry_total": THROTTLE_RETRIES,
        "retry_backoff_max": THROTTLE_MAX_WAIT_SECONDS,
        **client_options,
    }
    client = CosmosClient(endpoint, credential=auth, **options)
    connection = CosmosConnection(client, owned)
    try:
        with unavailable_errors(f"connecting to {endpoint}"):
            # Reads the account (regions, consistency) once, so the first store call is not slower.
            await client.__aenter__()
    except BaseException:
        await connection.close()
        raise
    return connection


async def ensure_database(client: CosmosClient, name: str) -> tuple[DatabaseProxy, str]:
    """The database, created if missing, and a line saying which."""
    with unavailable_errors(f"creating database {name}"):
        try:
            database = await client.create_database(name)
        except CosmosResourceExistsError:
            return client.get_database_client(name), f"found database {name}"
    return database, f"created database {name}"


def _index_key(index: Sequence[Mapping[str, Any]]) -> tuple[tuple[str, str], ...]:
    return tuple((str(part["path"]), str(part.get("order", ASC)).lower()) for part in index)


async def ensure_container(database: DatabaseProxy, spec: ContainerSpec) -> tuple[ContainerProxy, str]:
    """The container, created as spec says or brought up to it (indexes added, TTL on); and a line saying which."""
    policy: Any = dict(spec.indexing_policy) if spec.indexing_policy else None
    with unavailable_errors(f"creating container {spec.name}"):
        try:
            container = await database.create_container(
                spec.name, PartitionKey(spec.partition_key), indexing_policy=policy, default_ttl=spec.default_ttl
            )
            return container, f"created container {spec.name} ({_summary(spec)})"
        except CosmosResourceExistsError:
            container = database.get_container_client(spec.name)
        properties = await container.read()
    paths = properties.get("partitionKey", {}).get("paths", [])
    if paths != [spec.partition_key]:
        raise ValueError(
            f"container {spec.name} is partitioned on {paths}, not [{spec.partition_key!r}]; "
            "a partition key cannot be changed in place: use another container name"
        )
    current: dict[str, Any] = dict(properties.get("indexingPolicy") or {})
    have = {_index_key(index) for index in current.get("compositeIndexes", [])}
    missing = [index for index in spec.composite_indexes if _index_key(index) not in have]
    ttl_missing = spec.default_ttl is not None and properties.get("defaultTtl") is None
    if not missing and not ttl_missing:
        return container, f"found container {spec.name} ({_summary(spec)})"
    current["compositeIndexes"] = [*current.get("compositeIndexes", []), *missing]
    with unavailable_errors(f"updating container {spec.name}"):
        container = await database.replace_container(
            container,
            PartitionKey(spec.partition_key),
            indexing_policy=current,
            default_ttl=spec.default_ttl if ttl_missing else properties.get("defaultTtl"),
        )
    changes = [f"added {len(missing)} composite index(es)"] if missing else []
    changes += ["turned on per-item TTL"] if ttl_missing else []
    return container, f"updated container {spec.name}: {', '.join(changes)}"


def _summary(spec: ContainerSpec) -> str:
    ttl = "TTL off" if spec.default_ttl is None else f"default TTL {spec.default_ttl}"
    return f"partition key {spec.partition_key}, {len(spec.composite_indexes)} composite index(es), {ttl}"


async def open_container(
    client: CosmosClient, database: str, spec: ContainerSpec, *, create: bool, verify: bool = True
) -> tuple[ContainerProxy, dict[str, Any]]:
    """The container and its properties, read once to prove it exists; created first when create is set.

    verify=False skips the read (properties come back empty): the SDK then reads them on the
    first call, so a process can start while the container does not answer.
    """
    if create:
        db, _ = await ensure_database(client, database)
        container, _ = await ensure_container(db, spec)
    else:
        container = client.get_database_client(database).get_container_client(spec.name)
    if not verify:
        return container, {}
    with unavailable_errors(f"reading container {database}/{spec.name}"):
        try:
            # Also caches the container's properties, which every later call needs.
            properties = dict(await container.read())
        except CosmosResourceNotFoundError:
            raise StoreUnavailableError(
                f"cosmos: container {database}/{spec.name} does not exist; run `embedding-jobs init-db`"
            ) from None
    return container, properties


async def open_containers(
    specs: Sequence[ContainerSpec],
    *,
    database: str,
    client: CosmosClient | None = None,
    endpoint: str = "",
    key: str = "",
    credential: AsyncTokenCredential | None = None,
    create: bool = False,
    verify: bool = True,
) -> tuple[list[tuple[ContainerProxy, dict[str, Any]]], CosmosConnection | None]:
    """The containers of specs (with open_container's properties) on client, or on a new connection to endpoint.

    A connection opened here is returned to its new owner (the caller closes it), and closed
    again if a container cannot be opened.
    """
    connection = None
    if client is None:
        connection = await connect(endpoint, key, credential=credential)
        client = connection.client
    try:
        opened = [await open_container(client, database, spec, create=create, verify=verify) for spec in specs]
    except BaseException:
        if connection is not None:
            await connection.close()
        raise
    return opened, connection
