"""The REST API against the real app, a real SQLite job store and a real local queue."""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from exporter import api
from exporter.app import create_app
from jobs.errors import InvalidTenantError
from jobs.model import Job, JobStatus, validate_tenant_id
from jobs.settings import Settings
from jobs.sqlite_store import SQLiteJobStore
from tests.helpers.api import Enqueue, queue_sender
from worker.local_queue import LocalQueue
from worker.messages import JobMessage, parse_message

S = JobStatus
TENANT_TOKEN = "tenant-a-token-123456"
OPERATOR_TOKEN = "operator-token-123456"
SETTINGS = Settings(api_tokens=f"{TENANT_TOKEN}=tenant-a;{OPERATOR_TOKEN}=*")
TENANT = {"Authorization": f"Bearer {TENANT_TOKEN}"}
OPERATOR = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
BASE = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
ALLOWED_STATUSES = "pending, processing, completed, failed, dead_lettered"

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[..., Awaitable[Client]]


def make_job(
    tenant: str, n: int, status: JobStatus = S.PENDING, *, error: str | None = None, retry_count: int = 0
) -> Job:
    """A job whose creation and update times grow with n, so the order of a listing is known."""
    at = BASE + timedelta(minutes=n)
    return Job(
        id=f"job-{n:03d}",
        tenant_id=tenant,
        shard_id=f"shard-{n}",
        shard_type_id="doc",
        status=status,
        retry_count=retry_count,
        error=error,
        created_at=at,
        updated_at=at,
    )


def stats_of(**counts: int) -> dict[str, int]:
    return {status.value: counts.get(status.value, 0) for status in JobStatus}


@pytest.fixture
async def job_store(tmp_path: Path) -> AsyncIterator[SQLiteJobStore]:
    store = await SQLiteJobStore.open(tmp_path / "jobs.db")
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[LocalQueue]:
    async with LocalQueue(tmp_path / "queue.db") as local_queue:
        yield local_queue


@pytest.fixture
def make_client(aiohttp_client: ClientFactory, job_store: SQLiteJobStore) -> Callable[..., Awaitable[Client]]:
    """Builds the real app over job_store with the given enqueue (None: no queue configured)."""

    async def build(enqueue: Enqueue | None = None, settings: Settings = SETTINGS) -> Client:
        return await aiohttp_client(create_app(settings, job_store, enqueue=enqueue))

    return build


@pytest.fixture
async def client(make_client: Callable[..., Awaitable[Client]], queue: LocalQueue) -> Client:
    return await make_client(queue_sender(queue))


async def seed(store: SQLiteJobStore, *jobs: Job) -> list[Job]:
    return [await store.create(job) for job in jobs]


async def error_of(response: Any, status: int) -> tuple[str, str]:
    assert response.status == status, await response.text()
    body = await response.json()
    return body["error"]["code"], body["error"]["message"]


# -- list, get, stats ---------------------------------------------------------------


async def test_list_returns_the_tenants_jobs_newest_first(client: Client, job_store: SQLiteJobStore) -> None:
    jobs = await seed(
        job_store,
        make_job("tenant-a", 1),
        make_job("tenant-a", 2, S.COMPLETED),
        make_job("tenant-a", 3, S.FAILED, error="boom", retry_count=2),
        make_job("tenant-b", 4),
    )

    response = await client.get("/api/v1/embedding-jobs", params={"tenantId": "tenant-a"}, headers=TENANT)

    assert response.status == 200
    assert await response.json() == {
        "items": [jobs[2].to_json(), jobs[1].to_json(), jobs[0].to_json()],
        "continuationToken": None,
    }


async def test_list_filters_by_status(client: Client, job_store: SQLiteJobStore) -> None:
    await seed(job_store, make_job("tenant-a", 1), make_job("tenant-a", 2, S.FAILED), make_job("tenant-a", 3))

    response = await client.get(
        "/api/v1/embedding-jobs", params={"tenantId": "tenant-a", "status": "pending"}, headers=TENANT
    )

    body = await response.json()
    assert [item["id"] for item in body["items"]] == ["job-003", "job-001"]
    assert {item["status"] for item in body["items"]} == {"pending"}


async def test_paging_with_continuation_returns_every_job_once(client: Client, job_store: SQLiteJobStore) -> None:
    jobs = [make_job("tenant-a", n) for n in range(7)]
    # Two jobs created in the same millisecond: the id breaks the tie, so neither is lost nor repeated.
    jobs.append(make_job("tenant-a", 3).with_changes(id="job-003b"))
    await seed(job_store, *jobs)
    seen: list[str] = []
    params = {"tenantId": "tenant-a", "limit": "3"}
    pages = 0
    while True:
        response = await client.get("/api/v1/embedding-jobs", params=params, headers=OPERATOR)
        assert response.status == 200
        body = await response.json()
        pages += 1
        assert len(body["items"]) <= 3
        seen += [item["id"] for item in body["items"]]
        if body["continuationToken"] is None:
            break
        params["continuationToken"] = body["continuationToken"]

    assert pages == 3
    assert len(seen) == len(set(seen)) == 8
    assert set(seen) == {job.id for job in jobs}


async def test_get_returns_the_job(client: Client, job_store: SQLiteJobStore) -> None:
    [job] = await seed(job_store, make_job("tenant-a", 1, S.DEAD_LETTERED, error="gave up", retry_count=3))

    response = await client.get("/api/v1/embedding-jobs/job-001", params={"tenantId": "tenant-a"}, headers=TENANT)

    assert response.status == 200
    assert await response.json() == job.to_json()


async def test_get_of_an_unknown_job_is_404(client: Client, job_store: SQLiteJobStore) -> None:
    await seed(job_store, make_job("tenant-b", 1))

    # The job exists, but in another tenant: tenants never see each other's jobs.
    response = await client.get("/api/v1/embedding-jobs/job-001", params={"tenantId": "tenant-a"}, headers=OPERATOR)

    assert await error_of(response, 404) == ("not_found", "job 'job-001' not found in tenant 'tenant-a'")


async def test_stats_of_one_tenant_name_every_status(client: Client, job_store: SQLiteJobStore) -> None:
    await seed(
        job_store,
        make_job("tenant-a", 1),
        make_job("tenant-a", 2),
        make_job("tenant-a", 3, S.FAILED),
        make_job("tenant-b", 4, S.COMPLETED),
    )

    response = await client.get("/api/v1/embedding-jobs/stats", params={"tenantId": "tenant-a"}, headers=TENANT)

    assert response.status == 200
    assert await response.json() == {"tenantId": "tenant-a", "stats": stats_of(pending=2, failed=1)}


async def test_stats_without_tenant_give_operators_every_tenant(client: Client, job_store: SQLiteJobStore) -> None:
    await seed(job_store, make_job("tenant-b", 1, S.COMPLETED), make_job("tenant-a", 2), make_job("tenant-c", 3))

    response = await client.get("/api/v1/embedding-jobs/stats", headers=OPERATOR)

    assert await response.json() == {
        "tenants": {
            "tenant-a": stats_of(pending=1),
            "tenant-b": stats_of(completed=1),
            "tenant-c": stats_of(pending=1),
        }
    }


async def test_stats_without_tenant_give_a_tenant_token_only_its_tenants(
    client: Client, job_store: SQLiteJobStore
) -> None:
    await seed(job_store, make_job("tenant-a", 1, S.FAILED), make_job("tenant-b", 2))

    response = await client.get("/api/v1/embedding-jobs/stats", headers=TENANT)

    assert await response.json() == {"tenants": {"tenant-a": stats_of(failed=1)}}


async def test_without_configured_tokens_every_caller_is_an_operator(
    make_client: Callable[..., Awaitable[Client]], job_store: SQLiteJobStore
) -> None:
    await seed(job_store, make_job("tenant-b", 1))
    client = await make_client(settings=Settings())

    response = await client.get("/api/v1/embedding-jobs/stats")

    assert await response.json() == {"tenants": {"tenant-b": stats_of(pending=1)}}


# -- authentication and authorisation -------------------------------------------------

API_CALLS = [
    ("GET", "/api/v1/embedding-jobs?tenantId=tenant-a"),
    ("GET", "/api/v1/embedding-jobs/stats?tenantId=tenant-a"),
    ("GET", "/api/v1/embedding-jobs/stats"),
    ("GET", "/api/v1/embedding-jobs/job-001?tenantId=tenant-a"),
    ("POST", "/api/v1/embedding-jobs/job-001/retry?tenantId=tenant-a"),
    ("GET", "/api/v1/overview"),
]


@pytest.mark.parametrize(("method", "url"), API_CALLS)
@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer not-a-configured-token", f"Basic {TENANT_TOKEN}", "Bearer ", f"Bearer {TENANT_TOKEN}x"],
)
async def test_calls_without_a_valid_bearer_token_are_401(
    client: Client, method: str, url: str, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}

    response = await client.request(method, url, headers=headers)

    assert await error_of(response, 401) == (
        "unauthorized",
        "a valid bearer token is required: send 'Authorization: Bearer TOKEN'",
    )
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    ("method", "url"), [(method, url.replace("tenant-a", "tenant-b")) for method, url in API_CALLS if "tenant-a" in url]
)
async def test_a_tenant_token_may_not_read_another_tenant(
    client: Client, job_store: SQLiteJobStore, method: str, url: str
) -> None:
    [job] = await seed(job_store, make_job("tenant-b", 1, S.FAILED))

    response = await client.request(method, url, headers=TENANT)

    assert await error_of(response, 403) == ("forbidden", "this token may not read tenant 'tenant-b'")
    assert await job_store.get("tenant-b", "job-001") == job


async def test_the_overview_of_a_tenant_token_leaves_other_tenants_out(
    client: Client, job_store: SQLiteJobStore
) -> None:
    await seed(job_store, make_job("tenant-a", 1), make_job("tenant-b", 2, S.FAILED))

    body = await (await client.get("/api/v1/overview", headers=TENANT)).json()

    assert [tenant["tenantId"] for tenant in body["tenants"]] == ["tenant-a"]
    assert body["recentFailures"] == []


async def test_the_openapi_document_needs_no_token(client: Client) -> None:
    response = await client.get("/api/v1/openapi.json")

    assert response.status == 200
    assert response.content_type == "application/json"
    assert (await response.json())["openapi"].startswith("3.1")


# -- validation ---------------------------------------------------------------------


def tenant_error(value: str) -> str:
    with pytest.raises(InvalidTenantError) as caught:
        validate_tenant_id(value)
    return str(caught.value)


BAD_REQUESTS = [
    pytest.param(
        "GET",
        "/api/v1/embedding-jobs",
        "missing_parameter",
        "the tenantId query parameter is required",
        id="list-no-tenant",
    ),
    pytest.param(
        "GET",
        "/api/v1/embedding-jobs?tenantId=",
        "missing_parameter",
        "the tenantId query parameter is required",
        id="list-empty-tenant",
    ),
    pytest.param(
        "GET",
        "/api/v1/embedding-jobs/job-001",
        "missing_parameter",
        "the tenantId query parameter is required",
        id="get-no-tenant",
    ),
    pytest.param(
        "POST",
        "/api/v1/embedding-jobs/job-001/retry",
        "missing_parameter",
        "the tenantId query parameter is required",
        id="retry-no-tenant",
    ),
    pytest.param(
        "GET",
        "/api/v1/embedding-jobs?tenantId=bad%20tenant!",
        "invalid_tenant",
        tenant_error("bad tenant!"),
        id="list-invalid-tenant",
    ),
    pytest.param(
        "GET",
        "/api/v1/embedding-jobs/stats?tenantId=" + "t" * 65,
        "invalid_tenant",
        tenant_error("t" * 65),
        id="stats-long-tenant",
    ),
    pytest.param(
        "GET",
        "/api/v1/embedding-jobs?tenantId=tenant-a&tenantId=tenant-b",
        "invalid_parameter",
        "tenantId must be given at most once",
        id="tenant-twice",
    ),
    pytest.param(
        "GET",
        "/api/v1/embedding-jobs?tenantId=tenant-a&status=done",
        "invalid_status",
        f"unknown status 'done'; use one of: {ALLOWED_STATUSES}",
        id="unknown-status",
    ),
    pytest.param(
        "GET",
        "/api/v1/embedding-jobs?tenantId=tenant-a&status=PENDING",
        "invalid_status",
        f"unknown status 'PENDING'; use one of: {ALLOWED_STATUSES}",
        id="status-case",
    ),
    *(
        pytest.param(
            "GET",
            f"/api/v1/embedding-jobs?tenantId=tenant-a&limit={quote(limit)}",
            "invalid_limit",
            f"limit must be an integer from 1 to 500; got {limit!r}",
            id=f"limit-{limit}",
        )
        for limit in ["0", "501", "abc", "-1", "1.5", "+5", "1_0", "9999999"]
    ),
    pytest.param(
        "GET",
        "/api/v1/embedding-jobs?tenantId=tenant-a&continuationToken=not-a-token",
        "invalid_continuation_token",
        "malformed continuation token",
        id="malformed-token",
    ),
    pytest.param(
        "GET",
        "/api/v1/embedding-jobs/bad%20id?tenantId=tenant-a",
        "invalid_job_id",
        "jobId must be at most 128 characters of letters, digits, '.', '_' and '-'",
        id="invalid-job-id",
    ),
]


@pytest.mark.parametrize(("method", "url", "code", "message"), BAD_REQUESTS)
async def test_invalid_requests_are_400_with_a_message(
    client: Client, method: str, url: str, code: str, message: str
) -> None:
    response = await client.request(method, url, headers=OPERATOR)

    assert await error_of(response, 400) == (code, message)


async def test_a_continuation_token_from_another_query_is_400(client: Client, job_store: SQLiteJobStore) -> None:
    await seed(job_store, *(make_job("tenant-a", n) for n in range(3)))
    first = await client.get("/api/v1/embedding-jobs", params={"tenantId": "tenant-a", "limit": "1"}, headers=OPERATOR)
    token = (await first.json())["continuationToken"]
    assert token is not None

    response = await client.get(
        "/api/v1/embedding-jobs",
        params={"tenantId": "tenant-a", "status": "pending", "continuationToken": token},
        headers=OPERATOR,
    )

    assert await error_of(response, 400) == (
        "invalid_continuation_token",
        "continuation token belongs to a different query",
    )


async def test_an_empty_limit_means_the_default(client: Client, job_store: SQLiteJobStore) -> None:
    await seed(job_store, *(make_job("tenant-a", n) for n in range(51)))

    response = await client.get("/api/v1/embedding-jobs?tenantId=tenant-a&limit=", headers=OPERATOR)

    body = await response.json()
    assert len(body["items"]) == 50
    assert body["continuationToken"] is not None


# -- store outage ----------------------------------------------------------------------


@pytest.mark.parametrize(("method", "url"), API_CALLS)
async def test_an_unreachable_store_is_503(client: Client, job_store: SQLiteJobStore, method: str, url: str) -> None:
    await job_store.close()

    response = await client.request(method, url, headers=OPERATOR)

    assert await error_of(response, 503) == ("store_unavailable", "the job store is unavailable; try again later")


# -- retry ---------------------------------------------------------------------------


@pytest.mark.parametrize("status", [S.FAILED, S.DEAD_LETTERED])
async def test_retry_puts_the_job_back_to_pending_and_sends_its_message(
    client: Client, job_store: SQLiteJobStore, queue: LocalQueue, status: JobStatus
) -> None:
    await seed(job_store, make_job("tenant-a", 1, status, error="embedder said no", retry_count=3))

    response = await client.post(
        "/api/v1/embedding-jobs/job-001/retry", params={"tenantId": "tenant-a"}, headers=TENANT
    )

    assert response.status == 202
    stored = await job_store.get("tenant-a", "job-001")
    assert await response.json() == stored.to_json()
    assert (stored.status, stored.retry_count, stored.error, stored.completed_at) == (
        S.PENDING,
        0,
        "embedder said no",
        None,
    )
    assert await job_store.stats("tenant-a") == {**dict.fromkeys(JobStatus, 0), S.PENDING: 1}
    [message] = await queue.receive(max_messages=10, max_wait=0)
    assert parse_message(message.body) == JobMessage("job-001", "tenant-a", "shard-1", "doc", attempt=0)
    assert message.message_id == "job-001"


@pytest.mark.parametrize("status", [S.PENDING, S.PROCESSING, S.COMPLETED])
async def test_retry_of_a_job_that_has_not_failed_is_409(
    client: Client, job_store: SQLiteJobStore, queue: LocalQueue, status: JobStatus
) -> None:
    [job] = await seed(job_store, make_job("tenant-a", 1, status))

    response = await client.post("/api/v1/embedding-jobs/job-001/retry?tenantId=tenant-a", headers=TENANT)

    assert await error_of(response, 409) == (
        "conflict",
        f"job 'job-001' is {status.value}; only failed or dead_lettered jobs can be retried",
    )
    assert await job_store.get("tenant-a", "job-001") == job
    assert await queue.receive(max_wait=0) == []


async def test_retry_of_an_unknown_job_is_404(client: Client) -> None:
    response = await client.post("/api/v1/embedding-jobs/job-404/retry?tenantId=tenant-a", headers=TENANT)

    assert await error_of(response, 404) == ("not_found", "job 'job-404' not found in tenant 'tenant-a'")


async def test_retry_without_a_queue_is_503_and_changes_nothing(
    make_client: Callable[..., Awaitable[Client]], job_store: SQLiteJobStore
) -> None:
    [job] = await seed(job_store, make_job("tenant-a", 1, S.FAILED, error="boom", retry_count=2))
    client = await make_client(enqueue=None)

    response = await client.post("/api/v1/embedding-jobs/job-001/retry?tenantId=tenant-a", headers=TENANT)

    assert await error_of(response, 503) == (
        "retry_unavailable",
        "retries are not available: this exporter has no queue to send to",
    )
    assert await job_store.get("tenant-a", "job-001") == job


async def test_retry_whose_message_cannot_be_sent_dead_letters_the_job(
    make_client: Callable[..., Awaitable[Client]], job_store: SQLiteJobStore, tmp_path: Path
) -> None:
    await seed(job_store, make_job("tenant-a", 1, S.FAILED, error="boom", retry_count=2))
    # A real queue that is not open: sending raises QueueUnavailableError.
    closed_queue = LocalQueue(tmp_path / "closed-queue.db")
    client = await make_client(enqueue=queue_sender(closed_queue))
    reason = "retry could not be enqueued: local queue 'embedding-jobs' is not open; call open() or use async with"

    response = await client.post("/api/v1/embedding-jobs/job-001/retry?tenantId=tenant-a", headers=TENANT)

    assert await error_of(response, 503) == ("enqueue_failed", f"{reason}; the job is dead_lettered again")
    stored = await job_store.get("tenant-a", "job-001")
    assert (stored.status, stored.error, stored.retry_count) == (S.DEAD_LETTERED, reason, 0)
    assert stored.completed_at is not None
    assert await job_store.stats("tenant-a") == {**dict.fromkeys(JobStatus, 0), S.DEAD_LETTERED: 1}


# -- overview -----------------------------------------------------------------------


async def test_overview_sums_up_each_tenant_and_lists_recent_failures(
    client: Client, job_store: SQLiteJobStore
) -> None:
    jobs = await seed(
        job_store,
        make_job("tenant-b", 1, S.COMPLETED),
        make_job("tenant-a", 2, S.COMPLETED),
        make_job("tenant-a", 3, S.FAILED, error="timeout"),
        make_job("tenant-a", 4, S.COMPLETED),
        make_job("tenant-a", 5, S.PENDING),
        make_job("tenant-b", 6, S.DEAD_LETTERED, error="gave up"),
        make_job("tenant-a", 7, S.DEAD_LETTERED, error="bad shard"),
        make_job("tenant-c", 8, S.PROCESSING),
    )

    response = await client.get("/api/v1/overview", headers=OPERATOR)

    assert response.status == 200
    body = await response.json()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", body["generatedAt"])
    assert body["tenants"] == [
        {
            "tenantId": "tenant-a",
            "stats": stats_of(pending=1, completed=2, failed=1, dead_lettered=1),
            "total": 5,
            "failureRatio": 0.5,
        },
        {
            "tenantId": "tenant-b",
            "stats": stats_of(completed=1, dead_lettered=1),
            "total": 2,
            "failureRatio": 0.5,
        },
        {"tenantId": "tenant-c", "stats": stats_of(processing=1), "total": 1, "failureRatio": 0.0},
    ]
    assert body["recentFailures"] == [jobs[6].to_json(), jobs[5].to_json(), jobs[2].to_json()]
    assert body["truncated"] is False


async def test_overview_failure_ratio_counts_only_finished_jobs(client: Client, job_store: SQLiteJobStore) -> None:
    await seed(
        job_store,
        *(make_job("tenant-a", n, S.COMPLETED) for n in range(2)),
        make_job("tenant-a", 2, S.FAILED),
        *(make_job("tenant-a", n, S.PENDING) for n in range(3, 10)),
    )

    body = await (await client.get("/api/v1/overview", headers=OPERATOR)).json()

    assert body["tenants"][0]["failureRatio"] == pytest.approx(1 / 3)
    assert body["tenants"][0]["total"] == 10


async def test_overview_keeps_the_twenty_newest_failures(client: Client, job_store: SQLiteJobStore) -> None:
    # Six tenants with five failed and five dead-lettered jobs each: 60 failures, newest per tenant read.
    jobs = [
        make_job(f"tenant-{t}", t * 100 + n, S.FAILED if n % 2 else S.DEAD_LETTERED)
        for t in range(6)
        for n in range(10)
    ]
    await seed(job_store, *jobs)

    body = await (await client.get("/api/v1/overview", headers=OPERATOR)).json()

    newest = sorted(jobs, key=lambda job: job.updated_at, reverse=True)[:20]
    assert body["recentFailures"] == [job.to_json() for job in newest]
    assert body["truncated"] is False


async def test_overview_scans_a_bounded_number_of_tenants_and_says_so(
    client: Client, job_store: SQLiteJobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api, "OVERVIEW_TENANT_SCAN_LIMIT", 2)
    # tenant-0 has no failures, so it does not use up the scan budget.
    await seed(
        job_store,
        make_job("tenant-0", 1, S.COMPLETED),
        make_job("tenant-1", 2, S.FAILED),
        make_job("tenant-2", 3, S.FAILED),
        make_job("tenant-3", 4, S.FAILED),
    )

    body = await (await client.get("/api/v1/overview", headers=OPERATOR)).json()

    assert [tenant["tenantId"] for tenant in body["tenants"]] == ["tenant-0", "tenant-1", "tenant-2", "tenant-3"]
    assert [(job["tenantId"], job["id"]) for job in body["recentFailures"]] == [
        ("tenant-2", "job-003"),
        ("tenant-1", "job-002"),
    ]
    assert body["truncated"] is True


# -- response headers ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "url", "headers", "status"),
    [
        ("GET", "/api/v1/embedding-jobs?tenantId=tenant-a", OPERATOR, 200),
        ("GET", "/api/v1/embedding-jobs/stats", OPERATOR, 200),
        ("GET", "/api/v1/embedding-jobs?tenantId=tenant-a", {}, 401),
        ("GET", "/api/v1/embedding-jobs?tenantId=bad%20tenant", OPERATOR, 400),
        ("GET", "/api/v1/embedding-jobs/missing?tenantId=tenant-a", OPERATOR, 404),
        ("POST", "/api/v1/embedding-jobs/missing/retry?tenantId=tenant-a", OPERATOR, 404),
        ("GET", "/api/v1/openapi.json", {}, 200),
        ("GET", "/no/such/route", {}, 404),
        ("DELETE", "/api/v1/embedding-jobs/stats", OPERATOR, 405),
        ("GET", "/healthz", {}, 200),
        ("GET", "/readyz", {}, 200),
        ("GET", "/metrics", {}, 200),
        ("GET", "/", {}, 200),
    ],
)
async def test_every_response_forbids_content_sniffing(
    client: Client, method: str, url: str, headers: dict[str, str], status: int
) -> None:
    response = await client.request(method, url, headers=headers)

    assert response.status == status, await response.text()
    assert response.headers["X-Content-Type-Options"] == "nosniff"


# -- OpenAPI ------------------------------------------------------------------------

HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
SERVICE_PATHS = {"/healthz", "/readyz", "/metrics", "/"}


@pytest.fixture
async def spec(client: Client) -> dict[str, Any]:
    response = await client.get("/api/v1/openapi.json")
    document: dict[str, Any] = await response.json()
    return document


def documented_operations(spec: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in spec["paths"].items() for method in item if method in HTTP_METHODS}


async def test_openapi_documents_exactly_the_routes_the_app_serves(client: Client, spec: dict[str, Any]) -> None:
    served = {
        (route.method, route.resource.canonical)
        for route in client.app.router.routes()
        if route.resource is not None
        and route.method != "HEAD"
        and (route.resource.canonical.startswith("/api/") or route.resource.canonical in SERVICE_PATHS)
    }

    assert documented_operations(spec) == served
    assert {path for _, path in served} >= SERVICE_PATHS


def resolve(spec: dict[str, Any], node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/"), ref
        node = spec
        for part in ref[2:].split("/"):
            assert part in node, f"unresolved $ref {ref}"
            node = node[part]
    return node


def walk(node: Any) -> Iterator[Any]:
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from walk(child)


async def test_openapi_document_is_well_formed(spec: dict[str, Any]) -> None:
    if importlib.util.find_spec("openapi_spec_validator") is not None:  # pragma: no cover - not a dependency
        importlib.import_module("openapi_spec_validator").validate(spec)
    assert spec["openapi"] == "3.1.0"
    assert spec["info"]["title"]
    assert spec["info"]["version"]
    for node in walk(spec):
        if isinstance(node, dict) and "$ref" in node:
            resolve(spec, node)
    schemes = spec["components"]["securitySchemes"]
    assert all(scheme["type"] == "http" and scheme["scheme"] == "bearer" for scheme in schemes.values())
    operation_ids = []
    for path, item in spec["paths"].items():
        assert path.startswith("/")
        path_params = [resolve(spec, p) for p in item.get("parameters", [])]
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                continue
            operation_ids.append(operation["operationId"])
            params = path_params + [resolve(spec, p) for p in operation.get("parameters", [])]
            assert len({(p["name"], p["in"]) for p in params}) == len(params), (method, path)
            for param in params:
                assert param["in"] in {"query", "path", "header", "cookie"}
                assert "schema" in param
                assert param["in"] != "path" or param["required"] is True
            # Every {name} in the path is declared as a path parameter, and nothing more.
            assert {p["name"] for p in params if p["in"] == "path"} == set(re.findall(r"{(\w+)}", path)), path
            assert operation["responses"], (method, path)
            for status, response in operation["responses"].items():
                assert re.fullmatch(r"[1-5]\d\d", status), (method, path, status)
                assert resolve(spec, response)["description"]
            for requirement in operation.get("security", spec["security"]):
                assert set(requirement) <= set(schemes)
    assert len(operation_ids) == len(set(operation_ids))


async def test_openapi_schemas_match_what_the_api_answers(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    full = make_job("tenant-a", 1, S.COMPLETED, error="x").with_changes(completed_at=BASE, trace_id="0" * 32).to_json()
    minimal = make_job("tenant-a", 1).to_json()
    assert set(full) == set(schemas["Job"]["properties"])
    assert set(schemas["Job"]["required"]) == set(minimal)
    assert schemas["JobStatus"]["enum"] == [status.value for status in JobStatus]
    assert schemas["Stats"]["required"] == list(stats_of())
    params = spec["components"]["parameters"]
    assert params["Limit"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}
