"""What the Cosmos DB job store adds to the shared contract: costs, TTL, setup, retries, outages."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any, ClassVar

import pytest
from azure.core.credentials import AccessToken
from azure.core.exceptions import ServiceRequestError, ServiceResponseError
from azure.cosmos import PartitionKey
from azure.cosmos.exceptions import CosmosHttpResponseError, CosmosResourceNotFoundError

from embedding_jobs.cosmos import init_db, run_init_db
from jobs.cosmos_containers import JOBS_COMPOSITE_INDEXES
from jobs.cosmos_setup import THROTTLE_MAX_WAIT_SECONDS, THROTTLE_RETRIES, is_unavailable
from jobs.cosmos_store import COUNTERS_ID, MAX_BATCH_OPERATIONS, CosmosJobStore
from jobs.errors import JobNotFoundError, StoreUnavailableError
from jobs.model import Job, JobStatus
from jobs.settings import Settings
from jobs.store import empty_stats
from tests.components import free_port, wait_until
from tests.conftest import CosmosDatabase
from tests.cosmos_server import CosmosServer, start_cosmos_server

S = JobStatus


def make_job(tenant: str = "tenant-a", n: int = 1) -> Job:
    return Job.new(job_id=f"job-{n}", tenant_id=tenant, shard_id=f"shard-{n}", shard_type_id="document")


@pytest.fixture
async def store(cosmos_db: CosmosDatabase) -> AsyncIterator[CosmosJobStore]:
    cosmos_store = await CosmosJobStore.open(client=cosmos_db.client, database=cosmos_db.name, create_if_missing=True)
    yield cosmos_store
    await cosmos_store.close()


async def raw(store: CosmosJobStore, tenant: str, item_id: str) -> dict[str, Any]:
    return dict(await store.container.read_item(item_id, partition_key=tenant))


async def test_a_job_lifecycle_costs_three_round_trips(store: CosmosJobStore) -> None:
    await store.create(make_job(n=0))  # the tenant's first job also creates its counter document
    before = store.round_trips

    await store.create(make_job())
    await store.transition("tenant-a", "job-1", S.PENDING, S.PROCESSING)
    await store.transition("tenant-a", "job-1", S.PROCESSING, S.COMPLETED)

    assert store.round_trips - before == 3
    assert await store.stats("tenant-a") == {**empty_stats(), S.PENDING: 1, S.COMPLETED: 1}


async def test_stats_and_get_are_one_point_read_each(store: CosmosJobStore) -> None:
    await store.create(make_job())
    before = store.round_trips
    await store.stats("tenant-a")
    await store.get("tenant-a", "job-1")
    assert store.round_trips - before == 2


async def test_stats_all_cost_does_not_grow_with_the_number_of_jobs(store: CosmosJobStore) -> None:
    tenants = [f"tenant-{i}" for i in range(5)]

    async def cost_with(jobs_per_tenant: int, first: int) -> int:
        for tenant in tenants:
            for n in range(first, first + jobs_per_tenant):
                await store.create(make_job(tenant, n))
        before = store.round_trips
        stats = await store.stats_all()
        assert sorted(stats) == tenants
        assert all(s[S.PENDING] == first + jobs_per_tenant for s in stats.values())
        return store.round_trips - before

    with_10 = await cost_with(2, 0)  # 10 jobs
    with_200 = await cost_with(38, 2)  # 200 jobs
    assert with_10 == with_200 == 1


async def test_finished_jobs_carry_a_ttl_of_retention_plus_grace(cosmos_db: CosmosDatabase) -> None:
    async with await CosmosJobStore.open(
        client=cosmos_db.client,
        database=cosmos_db.name,
        create_if_missing=True,
        retention=timedelta(hours=2),
        expiry_grace=timedelta(hours=1),
    ) as store:
        for n in (1, 2):
            await store.create(make_job(n=n))
            await store.transition("tenant-a", f"job-{n}", S.PENDING, S.PROCESSING)
        await store.transition("tenant-a", "job-1", S.PROCESSING, S.COMPLETED)
        await store.transition("tenant-a", "job-2", S.PROCESSING, S.DEAD_LETTERED)
        assert (await raw(store, "tenant-a", "job-1"))["ttl"] == 3 * 3600
        assert (await raw(store, "tenant-a", "job-2"))["ttl"] == 3 * 3600
        # A manual retry reopens the job: it must not expire while pending.
        await store.transition("tenant-a", "job-2", S.DEAD_LETTERED, S.PENDING)
        assert (await raw(store, "tenant-a", "job-2"))["ttl"] == -1
        properties = await store.container.read()
        assert properties["defaultTtl"] == -1


async def test_without_retention_jobs_carry_no_ttl_and_the_container_has_ttl_off(store: CosmosJobStore) -> None:
    await store.create(make_job())
    await store.transition("tenant-a", "job-1", S.PENDING, S.PROCESSING)
    await store.transition("tenant-a", "job-1", S.PROCESSING, S.COMPLETED)
    assert "ttl" not in await raw(store, "tenant-a", "job-1")
    assert "defaultTtl" not in await store.container.read()


async def test_expired_jobs_leave_counters_that_recount_repairs(cosmos_db: CosmosDatabase) -> None:
    async with await CosmosJobStore.open(
        client=cosmos_db.client,
        database=cosmos_db.name,
        create_if_missing=True,
        retention=timedelta(seconds=1),
        expiry_grace=timedelta(0),
    ) as store:
        await store.create(make_job())
        await store.transition("tenant-a", "job-1", S.PENDING, S.DEAD_LETTERED)

        async def expired() -> bool:
            try:
                await store.get("tenant-a", "job-1")
            except JobNotFoundError:
                return True
            return False

        await wait_until(expired, "the finished job to expire", within=10, interval=0.05)
        # The service deletes expired items without touching the counters.
        assert (await store.stats("tenant-a"))[S.DEAD_LETTERED] == 1
        assert await store.recount() == {}
        assert await store.stats("tenant-a") == empty_stats()


async def test_purge_deletes_more_jobs_than_fit_one_batch_and_keeps_counters_exact(store: CosmosJobStore) -> None:
    total = MAX_BATCH_OPERATIONS + 30
    for n in range(total):
        await store.create(make_job(n=n))
        await store.transition("tenant-a", f"job-{n}", S.PENDING, S.DEAD_LETTERED)
    await store.create(make_job(n=total))  # pending: kept

    assert await store.purge(timedelta(seconds=-1)) == total

    assert await store.stats("tenant-a") == {**empty_stats(), S.PENDING: 1}
    assert await store.recount("tenant-a") == {"tenant-a": {**empty_stats(), S.PENDING: 1}}


async def test_recount_repairs_a_counter_document_edited_by_hand(store: CosmosJobStore) -> None:
    for n in range(3):
        await store.create(make_job(n=n))
    counters = await raw(store, "tenant-a", COUNTERS_ID)
    await store.container.replace_item(COUNTERS_ID, {**counters, "pending": 99, "failed": 4})
    assert (await store.stats("tenant-a"))[S.PENDING] == 99
    assert await store.recount() == {"tenant-a": {**empty_stats(), S.PENDING: 3}}
    assert await store.stats_all() == {"tenant-a": {**empty_stats(), S.PENDING: 3}}


async def test_a_deleted_counter_document_is_recreated_on_the_next_transition(store: CosmosJobStore) -> None:
    await store.create(make_job())
    await store.container.delete_item(COUNTERS_ID, partition_key="tenant-a")
    await store.transition("tenant-a", "job-1", S.PENDING, S.PROCESSING)
    assert await store.recount("tenant-a") == {"tenant-a": {**empty_stats(), S.PROCESSING: 1}}


async def test_the_counter_document_is_never_listed_or_read_as_a_job(store: CosmosJobStore) -> None:
    await store.create(make_job())
    with pytest.raises(JobNotFoundError):
        await store.get("tenant-a", COUNTERS_ID)
    assert [job.id for job in (await store.list("tenant-a")).items] == ["job-1"]


async def test_init_db_is_idempotent_and_the_indexes_read_back(cosmos_db: CosmosDatabase) -> None:
    args = (cosmos_db.client, cosmos_db.name, "jobs", "shards", "leases")
    first = await init_db(*args, retention=timedelta(days=7))
    again = await init_db(*args, retention=timedelta(days=7))

    assert [line.split()[0] for line in first] == ["created"] * 4
    assert [line.split()[0] for line in again] == ["found"] * 4
    database = cosmos_db.client.get_database_client(cosmos_db.name)
    jobs = await database.get_container_client("jobs").read()
    assert jobs["partitionKey"]["paths"] == ["/tenantId"]
    assert jobs["defaultTtl"] == -1
    assert jobs["indexingPolicy"]["compositeIndexes"] == JOBS_COMPOSITE_INDEXES
    assert [(part["path"], part["order"]) for part in jobs["indexingPolicy"]["compositeIndexes"][0]] == [
        ("/tenantId", "ascending"),
        ("/status", "ascending"),
        ("/createdAt", "descending"),
        ("/id", "descending"),
    ]
    shards = await database.get_container_client("shards").read()
    assert shards["partitionKey"]["paths"] == ["/tenantId"]
    leases = await database.get_container_client("leases").read()
    assert leases["partitionKey"]["paths"] == ["/id"]


async def test_init_db_brings_an_older_container_up_to_date(cosmos_db: CosmosDatabase) -> None:
    database = await cosmos_db.client.create_database(cosmos_db.name)
    await database.create_container("jobs", PartitionKey("/tenantId"))

    lines = await init_db(cosmos_db.client, cosmos_db.name, "jobs", "shards", "leases", retention=timedelta(days=1))

    assert lines[1] == f"updated container jobs: added {len(JOBS_COMPOSITE_INDEXES)} composite index(es), " + (
        "turned on per-item TTL"
    )
    jobs = await database.get_container_client("jobs").read()
    assert jobs["defaultTtl"] == -1
    assert jobs["indexingPolicy"]["compositeIndexes"] == JOBS_COMPOSITE_INDEXES


async def test_init_db_refuses_a_container_partitioned_otherwise(cosmos_db: CosmosDatabase) -> None:
    database = await cosmos_db.client.create_database(cosmos_db.name)
    await database.create_container("jobs", PartitionKey("/id"))
    with pytest.raises(ValueError, match="partition key cannot be changed"):
        await init_db(cosmos_db.client, cosmos_db.name, "jobs", "shards", "leases", retention=None)


async def test_run_init_db_uses_the_settings(cosmos_db: CosmosDatabase) -> None:
    settings = Settings(
        store="cosmos",
        cosmos_endpoint=cosmos_db.server.endpoint,
        cosmos_key=cosmos_db.server.key,
        cosmos_database=cosmos_db.name,
        retention_hours=24,
    )
    lines = await run_init_db(settings)
    assert lines[0] == f"created database {cosmos_db.name}"
    assert lines[1].startswith("created container embedding-jobs (partition key /tenantId, 5 composite index(es)")
    assert lines[1].endswith("default TTL -1)")


async def test_a_store_opened_by_endpoint_retries_throttled_requests(cosmos_db: CosmosDatabase) -> None:
    async with await CosmosJobStore.open(
        endpoint=cosmos_db.server.endpoint, key=cosmos_db.server.key, database=cosmos_db.name, create_if_missing=True
    ) as store:
        policy = store.container.client_connection.connection_policy
        assert policy.RetryOptions.MaxRetryAttemptCount == THROTTLE_RETRIES
        assert policy.RetryOptions.MaxWaitTimeInSeconds == THROTTLE_MAX_WAIT_SECONDS
        await store.create(make_job())
        assert (await store.get("tenant-a", "job-1")).status is S.PENDING


async def test_a_missing_container_says_how_to_create_it(cosmos_db: CosmosDatabase) -> None:
    with pytest.raises(StoreUnavailableError, match="run `embedding-jobs init-db`"):
        await CosmosJobStore.open(client=cosmos_db.client, database=cosmos_db.name)


async def test_an_unreachable_account_is_store_unavailable() -> None:
    with pytest.raises(StoreUnavailableError, match="ServiceRequestError"):
        await CosmosJobStore.open(endpoint=f"http://127.0.0.1:{free_port()}/", key="a2V5", database="db")


async def test_an_account_that_goes_away_makes_calls_store_unavailable(cosmos_server: CosmosServer) -> None:
    # A server of its own, since this test stops it (cosmos_server only skips when node is missing).
    with start_cosmos_server() as server:
        store = await CosmosJobStore.open(
            endpoint=server.endpoint, key=server.key, database="db", create_if_missing=True
        )
        try:
            await store.ping()
            server.stop()
            with pytest.raises(StoreUnavailableError):
                await store.create(make_job())
        finally:
            await store.close()


async def test_reading_a_job_of_another_tenant_is_not_found(store: CosmosJobStore) -> None:
    await store.create(make_job("tenant-b"))
    with pytest.raises(JobNotFoundError):
        await store.get("tenant-a", "job-1")
    with pytest.raises(CosmosResourceNotFoundError):
        await raw(store, "tenant-a", "job-1")


class FakeCredential:
    """A stand-in for DefaultAzureCredential that records whether it was closed."""

    made: ClassVar[list[FakeCredential]] = []

    def __init__(self) -> None:
        self.closed = False
        FakeCredential.made.append(self)

    async def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken("test-token", int(time.time()) + 3600)

    async def close(self) -> None:
        self.closed = True


async def test_without_a_key_the_store_uses_default_azure_credential_and_closes_it(
    cosmos_db: CosmosDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("azure.identity.aio.DefaultAzureCredential", FakeCredential)
    FakeCredential.made.clear()
    # The SDK sends bearer tokens over https only; the test server speaks http, so the
    # attempt fails, which also shows that the credential made for it is closed on failure.
    with pytest.raises(StoreUnavailableError, match="non-TLS"):
        await CosmosJobStore.open(endpoint=cosmos_db.server.endpoint, database=cosmos_db.name)
    assert [credential.closed for credential in FakeCredential.made] == [True]


def http_error(status: int) -> CosmosHttpResponseError:
    return CosmosHttpResponseError(status_code=status, message=f"status {status}")  # type: ignore[no-untyped-call]


@pytest.mark.parametrize(
    ("error", "unavailable"),
    [
        (ServiceRequestError("connection refused"), True),
        (ServiceResponseError("connection reset"), True),
        (http_error(503), True),
        (http_error(500), True),
        (http_error(429), True),
        (http_error(408), True),
        (http_error(412), False),
        (http_error(409), False),
        (http_error(404), False),
        (http_error(400), False),
    ],
)
def test_transient_errors_map_to_store_unavailable(error: Exception, unavailable: bool) -> None:
    assert is_unavailable(error) is unavailable


async def test_retention_on_a_container_with_ttl_off_is_reported(
    cosmos_db: CosmosDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    await init_db(cosmos_db.client, cosmos_db.name, "embedding-jobs", "shards", "leases", retention=None)
    async with await CosmosJobStore.open(client=cosmos_db.client, database=cosmos_db.name, retention=timedelta(days=1)):
        pass
    assert "finished jobs will not expire: run `embedding-jobs init-db`" in caplog.text
