"""The Cosmos DB test server behaves like Cosmos DB where the job store depends on it.

Each test exercises one gap of the stock @vercel/cosmosdb-server that launcher.js fills,
through the real azure-cosmos async SDK.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, cast

import pytest
from azure.core.async_paging import AsyncPageIterator
from azure.cosmos import PartitionKey
from azure.cosmos.aio import ContainerProxy, CosmosClient
from azure.cosmos.exceptions import CosmosBatchOperationError, CosmosResourceNotFoundError

from tests.cosmos_server import CosmosDatabase, CosmosServer

TENANT = "tenant-a"
OTHER_TENANT = "tenant-b"


@pytest.fixture
async def make_container(cosmos_db: CosmosDatabase) -> Callable[..., Awaitable[ContainerProxy]]:
    """Factory for containers partitioned on /tenantId in a database dropped after the test."""
    database = await cosmos_db.client.create_database(cosmos_db.name)

    async def make(**kwargs: Any) -> ContainerProxy:
        container: ContainerProxy = await database.create_container(
            f"jobs-{uuid.uuid4().hex[:8]}", partition_key=PartitionKey("/tenantId"), **kwargs
        )
        return container

    return make


@pytest.fixture
async def container(make_container: Callable[..., Awaitable[ContainerProxy]]) -> ContainerProxy:
    return await make_container()


async def exists(container: ContainerProxy, item_id: str, tenant: str = TENANT) -> bool:
    try:
        await container.read_item(item_id, partition_key=tenant)
    except CosmosResourceNotFoundError:
        return False
    return True


async def until(condition: Callable[[], Awaitable[bool]]) -> None:
    """Poll an async condition until it holds; the caller bounds the wait with asyncio.timeout."""
    # The state polled lives in the server process, so there is no event to wait on instead.
    while not await condition():  # noqa: ASYNC110
        await asyncio.sleep(0.05)


async def test_reading_missing_item_raises_not_found(container: ContainerProxy) -> None:
    with pytest.raises(CosmosResourceNotFoundError):
        await container.read_item("no-such-job", partition_key=TENANT)


async def test_client_with_default_options_reaches_server(cosmos_server: CosmosServer) -> None:
    # Endpoint discovery (on by default) follows the account's advertised endpoint.
    async with CosmosClient(cosmos_server.endpoint, credential=cosmos_server.key) as client:
        database = await client.create_database(f"test-{uuid.uuid4().hex}")
        await client.delete_database(database)


async def test_patch_filter_predicate_is_case_sensitive(container: ContainerProxy) -> None:
    await container.create_item({"id": "job-1", "tenantId": TENANT, "status": "Queued", "attemptCount": 0})

    patched = await container.patch_item(
        "job-1",
        partition_key=TENANT,
        patch_operations=[{"op": "set", "path": "/status", "value": "Running"}],
        filter_predicate="from c where c.status = 'Queued' AND c.attemptCount = 0",
    )

    assert patched["status"] == "Running"


async def test_batch_commits_conditioned_patch_and_increment(container: ContainerProxy) -> None:
    await container.create_item({"id": "job-1", "tenantId": TENANT, "status": "Queued", "attemptCount": 0})
    await container.create_item({"id": "counts", "tenantId": TENANT, "queued": 1, "running": 0})

    results = await container.execute_item_batch(
        [
            (
                "patch",
                (
                    "job-1",
                    [
                        {"op": "set", "path": "/status", "value": "Running"},
                        {"op": "incr", "path": "/attemptCount", "value": 1},
                    ],
                ),
                {"filter_predicate": "from c where c.status = 'Queued'"},
            ),
            (
                "patch",
                (
                    "counts",
                    [
                        {"op": "incr", "path": "/queued", "value": -1},
                        {"op": "incr", "path": "/running", "value": 1},
                    ],
                ),
            ),
        ],
        partition_key=TENANT,
    )

    assert [result["statusCode"] for result in results] == [200, 200]
    job = await container.read_item("job-1", partition_key=TENANT)
    counts = await container.read_item("counts", partition_key=TENANT)
    assert (job["status"], job["attemptCount"]) == ("Running", 1)
    assert (counts["queued"], counts["running"]) == (0, 1)


async def test_batch_with_failed_condition_changes_nothing(container: ContainerProxy) -> None:
    await container.create_item({"id": "job-1", "tenantId": TENANT, "status": "Queued"})
    await container.create_item({"id": "counts", "tenantId": TENANT, "done": 0})

    with pytest.raises(CosmosBatchOperationError) as caught:
        await container.execute_item_batch(
            [
                ("patch", ("counts", [{"op": "incr", "path": "/done", "value": 1}])),
                (
                    "patch",
                    ("job-1", [{"op": "set", "path": "/status", "value": "Done"}]),
                    {"filter_predicate": "from c where c.status = 'Running'"},
                ),
                ("create", ({"id": "job-2", "tenantId": TENANT, "status": "Queued"},)),
            ],
            partition_key=TENANT,
        )

    error = caught.value
    assert (error.error_index, error.status_code) == (1, 412)
    assert [response["statusCode"] for response in error.operation_responses] == [424, 412, 424]
    assert (await container.read_item("counts", partition_key=TENANT))["done"] == 0
    assert (await container.read_item("job-1", partition_key=TENANT))["status"] == "Queued"
    assert not await exists(container, "job-2")


async def test_batch_runs_every_operation_kind(container: ContainerProxy) -> None:
    await container.create_item({"id": "to-read", "tenantId": TENANT})
    await container.create_item({"id": "to-replace", "tenantId": TENANT, "v": 1})
    await container.create_item({"id": "to-delete", "tenantId": TENANT})

    results = await container.execute_item_batch(
        [
            ("create", ({"id": "created", "tenantId": TENANT},)),
            ("upsert", ({"id": "upserted", "tenantId": TENANT},)),
            ("replace", ("to-replace", {"id": "to-replace", "tenantId": TENANT, "v": 2})),
            ("read", ("to-read",)),
            ("delete", ("to-delete",)),
        ],
        partition_key=TENANT,
    )

    assert [result["statusCode"] for result in results] == [201, 201, 200, 200, 204]
    assert results[3]["resourceBody"]["id"] == "to-read"
    assert await exists(container, "created")
    assert await exists(container, "upserted")
    assert (await container.read_item("to-replace", partition_key=TENANT))["v"] == 2
    assert not await exists(container, "to-delete")


async def test_batch_rejects_item_from_another_partition(container: ContainerProxy) -> None:
    with pytest.raises(CosmosBatchOperationError) as caught:
        await container.execute_item_batch(
            [("create", ({"id": "stray", "tenantId": OTHER_TENANT},))], partition_key=TENANT
        )

    assert caught.value.status_code == 400
    assert not await exists(container, "stray", OTHER_TENANT)


async def test_query_with_partition_key_sees_only_that_partition(container: ContainerProxy) -> None:
    for tenant, count in ((TENANT, 2), (OTHER_TENANT, 3)):
        for i in range(count):
            await container.create_item({"id": f"job-{i}", "tenantId": tenant, "status": "Queued"})

    rows = [
        row
        async for row in container.query_items(
            "SELECT * FROM c WHERE c.status = @status ORDER BY c.id",
            parameters=[{"name": "@status", "value": "Queued"}],
            partition_key=TENANT,
        )
    ]
    counts: list[Any] = [
        n async for n in container.query_items("SELECT VALUE COUNT(1) FROM c", partition_key=OTHER_TENANT)
    ]

    assert [(row["tenantId"], row["id"]) for row in rows] == [(TENANT, "job-0"), (TENANT, "job-1")]
    assert counts == [3]


async def test_item_ttl_expires_item(make_container: Callable[..., Awaitable[ContainerProxy]]) -> None:
    # defaultTtl -1 turns TTL on without expiring items that set no ttl of their own.
    container = await make_container(default_ttl=-1)
    await container.create_item({"id": "short-lived", "tenantId": TENANT, "ttl": 1})
    await container.create_item({"id": "kept", "tenantId": TENANT})

    async with asyncio.timeout(10):
        await until(lambda: _gone(container, "short-lived"))

    assert await exists(container, "kept")


async def test_container_default_ttl_expires_items(make_container: Callable[..., Awaitable[ContainerProxy]]) -> None:
    container = await make_container(default_ttl=1)
    await container.create_item({"id": "default-ttl", "tenantId": TENANT})
    await container.create_item({"id": "never-expires", "tenantId": TENANT, "ttl": -1})

    async with asyncio.timeout(10):
        await until(lambda: _gone(container, "default-ttl"))

    assert await exists(container, "never-expires")


async def _gone(container: ContainerProxy, item_id: str) -> bool:
    return not await exists(container, item_id)


async def _change_feed(container: ContainerProxy, **kwargs: Any) -> tuple[list[str], str | None]:
    """Ids of one change feed read and the continuation to read on from."""
    pages = cast(AsyncPageIterator[dict[str, Any]], container.query_items_change_feed(**kwargs).by_page())
    ids = [item["id"] async for page in pages async for item in page]
    # When the read yields no page at all, the SDK leaves continuation_token unset; the
    # continuation is then only in the last response's etag.
    etag = container.client_connection.last_response_headers.get("etag")
    return ids, pages.continuation_token or etag


async def test_change_feed_continues_after_its_continuation(container: ContainerProxy) -> None:
    await container.create_item({"id": "a", "tenantId": TENANT, "v": 1})
    await container.create_item({"id": "b", "tenantId": OTHER_TENANT})
    first, continuation = await _change_feed(container, start_time="Beginning")
    await container.upsert_item({"id": "a", "tenantId": TENANT, "v": 2})
    await container.create_item({"id": "c", "tenantId": TENANT})

    second, continuation = await _change_feed(container, continuation=continuation)
    third, _ = await _change_feed(container, continuation=continuation)

    assert first == ["a", "b"]
    assert second == ["a", "c"]
    assert third == []


async def test_change_feed_from_now_skips_earlier_writes(container: ContainerProxy) -> None:
    await container.create_item({"id": "before", "tenantId": TENANT})
    first, continuation = await _change_feed(container, start_time="Now")
    await container.create_item({"id": "after", "tenantId": TENANT})

    second, _ = await _change_feed(container, continuation=continuation)

    assert first == []
    assert second == ["after"]
