"""Tenant isolation: two tenants hold jobs with the same ids; no caller and no store call crosses over.

The API matrix runs every endpoint (list, list by status, get, stats with and without tenantId,
retry, the overview the status page reads, the status page itself, and a continuation token
carried over from another tenant) for every caller (a token of tenant-a, of tenant-b, an
operator token, no token, an unknown token) against every target tenant (tenant-a, tenant-b,
and tenant-c, which holds no jobs), on the real app over each store backend. Each case must
give exactly the allowed status and data: a tenant token gets 403 for another tenant, and
no body ever carries another tenant's record, shard id, error text or count.

The store-layer tests do the same one level down: get, list, transition, stats, stuck,
recount and purge of one tenant never see or change the other tenant's job of the same id.

docs/reliability.md records the matrix size these tests print.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from exporter.app import create_app
from jobs.errors import InvalidContinuationError, JobNotFoundError
from jobs.model import Job, JobStatus
from jobs.settings import Settings
from jobs.store import JobStore, empty_stats
from tests.helpers.api import queue_sender
from worker.local_queue import LocalQueue
from worker.messages import parse_message

S = JobStatus
A, B, C = "tenant-a", "tenant-b", "tenant-c"
TARGETS = (A, B, C)
TOKENS = {A: "token-of-tenant-a-0123456789", B: "token-of-tenant-b-0123456789", "*": "operator-token-0123456789"}
SETTINGS = Settings(api_tokens=f"{TOKENS[A]}={A};{TOKENS[B]}={B};{TOKENS['*']}=*")
BASE = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[..., Awaitable[Client]]


@dataclass(frozen=True, slots=True)
class Caller:
    """Who calls: the Authorization header sent and the tenants it may read (None: every tenant)."""

    name: str
    headers: Mapping[str, str]
    tenants: frozenset[str] | None

    @property
    def authenticated(self) -> bool:
        return self.name not in ("no token", "unknown token")

    def may_read(self, tenant: str) -> bool:
        return self.authenticated and (self.tenants is None or tenant in self.tenants)


CALLERS = (
    Caller("tenant-a token", {"Authorization": f"Bearer {TOKENS[A]}"}, frozenset({A})),
    Caller("tenant-b token", {"Authorization": f"Bearer {TOKENS[B]}"}, frozenset({B})),
    Caller("operator token", {"Authorization": f"Bearer {TOKENS['*']}"}, None),
    Caller("no token", {}, frozenset()),
    Caller("unknown token", {"Authorization": "Bearer not-a-configured-token-0000"}, frozenset()),
)

# -- the seeded world: same job ids in both tenants, different contents and counts -------------

SHARED = {"job-1": S.PENDING, "job-2": S.COMPLETED, "job-3": S.FAILED, "job-4": S.DEAD_LETTERED}
ONLY = {A: {"only-a": S.PENDING}, B: {"only-b": S.COMPLETED, "job-5": S.PROCESSING}}


def retry_id(caller: Caller, target: str) -> str:
    """A failed job of its own for each retry case, present in tenant-a and tenant-b."""
    return f"retry-{caller.name.split()[0]}-{target}"


def job(tenant: str, job_id: str, status: JobStatus, n: int) -> Job:
    """A record whose shard id and error text name its tenant, so a leak is visible in any body."""
    at = BASE + timedelta(minutes=n)
    failed = status in (S.FAILED, S.DEAD_LETTERED)
    return Job(
        id=job_id,
        tenant_id=tenant,
        shard_id=f"{tenant}-shard-{job_id}",
        shard_type_id="doc",
        status=status,
        retry_count=2 if failed else 0,
        error=f"{tenant} failure of {job_id}" if failed else None,
        created_at=at,
        updated_at=at,
        completed_at=at if status in (S.COMPLETED, S.DEAD_LETTERED) else None,
    )


def seed_world() -> dict[str, dict[str, Job]]:
    world: dict[str, dict[str, Job]] = {A: {}, B: {}}
    for tenant in (A, B):
        specs = {**SHARED, **ONLY[tenant]}
        specs.update({retry_id(caller, target): S.FAILED for caller in CALLERS for target in TARGETS})
        for n, (job_id, status) in enumerate(specs.items()):
            world[tenant][job_id] = job(tenant, job_id, status, n)
    return world


def leak_markers(tenant: str) -> tuple[str, ...]:
    """Text only tenant's records carry."""
    return (f"{tenant}-shard-", f"{tenant} failure")


def counts(jobs: Mapping[str, Job]) -> dict[str, int]:
    stats = empty_stats()
    for j in jobs.values():
        stats[j.status] += 1
    return {status.value: stats[status] for status in JobStatus}


def canonical(items: list[dict[str, Any]]) -> list[str]:
    return sorted(json.dumps(item, sort_keys=True) for item in items)


def tenant_ids(value: Any) -> Iterator[str]:
    """Every tenantId value anywhere in a JSON document, and every key of a 'tenants' object."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "tenantId" and isinstance(item, str):
                yield item
            if key == "tenants" and isinstance(item, dict):
                yield from item
            yield from tenant_ids(item)
    elif isinstance(value, list):
        for item in value:
            yield from tenant_ids(item)


# -- the matrix --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Case:
    endpoint: str
    caller: Caller
    target: str | None

    def __str__(self) -> str:
        return f"{self.endpoint} as {self.caller.name} on {self.target or '-'}"


TARGETED = ("list", "list failed", "get shared id", "get other tenant's id", "stats", "foreign continuation", "retry")
UNTARGETED = ("stats of all", "overview", "status page")
READS = [Case(e, c, t) for e in TARGETED if e != "retry" for c in CALLERS for t in TARGETS] + [
    Case(e, c, None) for e in UNTARGETED for c in CALLERS
]
RETRIES = [Case("retry", c, t) for c in CALLERS for t in TARGETS]
MATRIX_SIZE = len(READS) + len(RETRIES)


class Matrix:
    """Runs cases against one app and store, checking each answer against the seeded world."""

    def __init__(self, client: Client, store: JobStore, world: dict[str, dict[str, Job]]) -> None:
        self.client = client
        self.store = store
        self.world = world
        self.retried: set[tuple[str, str]] = set()
        self.foreign_tokens: dict[str, str] = {}

    async def prepare(self) -> None:
        """A continuation token from listing another tenant, for each target."""
        for target, source in ((A, B), (B, A), (C, A)):
            page = await self.store.list(source, limit=1)
            assert page.continuation is not None
            self.foreign_tokens[target] = page.continuation

    def visible(self, caller: Caller) -> set[str]:
        """Tenants holding jobs whose data the caller may see."""
        return {t for t in self.world if caller.may_read(t)}

    def request(self, case: Case) -> tuple[str, str, dict[str, str]]:
        t = case.target or ""
        path = "/api/v1/embedding-jobs"
        match case.endpoint:
            case "list":
                return "GET", path, {"tenantId": t}
            case "list failed":
                return "GET", path, {"tenantId": t, "status": "failed"}
            case "get shared id":
                return "GET", f"{path}/job-1", {"tenantId": t}
            case "get other tenant's id":
                return "GET", f"{path}/{'only-a' if t != A else 'only-b'}", {"tenantId": t}
            case "stats":
                return "GET", f"{path}/stats", {"tenantId": t}
            case "foreign continuation":
                return "GET", path, {"tenantId": t, "limit": "1", "continuationToken": self.foreign_tokens[t]}
            case "retry":
                return "POST", f"{path}/{retry_id(case.caller, t)}/retry", {"tenantId": t}
            case "stats of all":
                return "GET", f"{path}/stats", {}
            case "overview":
                return "GET", "/api/v1/overview", {}
            case "status page":
                return "GET", "/", {}
        raise AssertionError(case.endpoint)

    def expected_status(self, case: Case) -> tuple[int, str | None]:
        """The status and, for errors, the error code the case must get."""
        if case.endpoint == "status page":
            return 200, None
        if not case.caller.authenticated:
            return 401, "unauthorized"
        if case.target is not None and not case.caller.may_read(case.target):
            return 403, "forbidden"
        holds = case.target in self.world
        match case.endpoint:
            case "get shared id":
                return (200, None) if holds else (404, "not_found")
            case "get other tenant's id":
                return 404, "not_found"
            case "foreign continuation":
                return 400, "invalid_continuation_token"
            case "retry":
                return (202, None) if holds else (404, "not_found")
        return 200, None

    def expected_body(self, case: Case) -> Any:
        """The exact JSON of a successful answer (the overview is checked apart)."""
        jobs = self.world.get(case.target or "", {})
        match case.endpoint:
            case "list":
                return {"items": canonical([j.to_json() for j in jobs.values()]), "continuationToken": None}
            case "list failed":
                failed = [j.to_json() for j in jobs.values() if j.status is S.FAILED]
                return {"items": canonical(failed), "continuationToken": None}
            case "get shared id":
                return jobs["job-1"].to_json()
            case "stats":
                return {"tenantId": case.target, "stats": counts(jobs)}
            case "stats of all":
                return {"tenants": {t: counts(self.world[t]) for t in sorted(self.visible(case.caller))}}
        return None

    async def run(self, case: Case) -> list[str]:
        """The problems with this case's answer (empty when it is exactly right)."""
        method, path, params = self.request(case)
        response = await self.client.request(method, path, params=params, headers=case.caller.headers)
        text = await response.text()
        status, code = self.expected_status(case)
        problems: list[str] = []
        if response.status != status:
            problems.append(f"status {response.status}, expected {status}: {text[:200]}")
            return problems
        # No body names data of a tenant the caller may not see.
        hidden = {A, B} - self.visible(case.caller)
        for tenant in hidden:
            for marker in leak_markers(tenant):
                if marker in text:
                    problems.append(f"body carries {marker!r} of {tenant}")
        if case.endpoint == "status page":
            return problems
        body = json.loads(text)
        if leaked := set(tenant_ids(body)) & hidden:
            problems.append(f"body names tenant(s) {sorted(leaked)}")
        if code is not None:
            if set(body) != {"error"} or body["error"].get("code") != code:
                problems.append(f"expected only the error {code!r}, got {text[:200]}")
            return problems
        if case.endpoint == "retry":
            problems += self.check_retry(case, body)
        elif case.endpoint == "overview":
            problems += self.check_overview(case.caller, body)
        else:
            if "items" in body:
                body["items"] = canonical(body["items"])
            if body != self.expected_body(case):
                problems.append(f"body differs from the target's data: {text[:300]}")
        return problems

    def check_retry(self, case: Case, body: dict[str, Any]) -> list[str]:
        assert case.target is not None
        job_id = retry_id(case.caller, case.target)
        before = self.world[case.target][job_id]
        problems = []
        if (body.get("tenantId"), body.get("id"), body.get("status")) != (case.target, job_id, "pending"):
            problems.append(f"retry answered {body}")
        if body.get("shardId") != before.shard_id:
            problems.append(f"retry answered another record: {body}")
        self.world[case.target][job_id] = Job.from_json(body)
        self.retried.add((case.target, job_id))
        return problems

    def check_overview(self, caller: Caller, body: dict[str, Any]) -> list[str]:
        visible = sorted(self.visible(caller))
        problems = []
        tenants = [(t["tenantId"], t["stats"], t["total"]) for t in body["tenants"]]
        expected = [(t, counts(self.world[t]), len(self.world[t])) for t in visible]
        if tenants != expected:
            problems.append(f"overview tenants {tenants}, expected {expected}")
        failures = body["recentFailures"]
        want = 0
        for t in visible:
            for status in (S.FAILED, S.DEAD_LETTERED):
                want += min(5, sum(j.status is status for j in self.world[t].values()))
        if len(failures) != min(want, 20):
            problems.append(f"overview lists {len(failures)} failures, expected {min(want, 20)}")
        for item in failures:
            record = self.world.get(item["tenantId"], {}).get(item["id"])
            if item["tenantId"] not in visible or record is None or item != record.to_json():
                problems.append(f"overview failure not a visible tenant's record: {item}")
        return problems


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[LocalQueue]:
    async with LocalQueue(tmp_path / "queue.db") as local_queue:
        yield local_queue


async def test_every_endpoint_token_and_tenant_gets_only_the_allowed_data(
    store: JobStore, queue: LocalQueue, aiohttp_client: ClientFactory
) -> None:
    world = seed_world()
    for tenant in world:
        for j in world[tenant].values():
            await store.create(j)
    client = await aiohttp_client(create_app(SETTINGS, store, enqueue=queue_sender(queue)))
    matrix = Matrix(client, store, world)
    await matrix.prepare()

    problems: dict[str, list[str]] = {}
    # Reads first, then retries (which change records), then the reads again over the changed world.
    for case in [*READS, *RETRIES, *READS]:
        if found := await matrix.run(case):
            problems[str(case)] = found
    print(
        f"tenant isolation matrix [{type(store).__name__}]: {MATRIX_SIZE} cases ({len(READS)} read twice), "
        f"{len(problems)} with problems"
    )
    assert problems == {}

    # Every record in both tenants is exactly what the allowed retries made of the seed: denied
    # calls changed nothing, and each retry changed only its own tenant's job of that id.
    for tenant, jobs in world.items():
        stored = (await store.list(tenant, limit=500)).items
        assert canonical([j.to_json() for j in stored]) == canonical([j.to_json() for j in jobs.values()])
    expected_retries = {(t, retry_id(c, t)) for c in CALLERS for t in (A, B) if c.may_read(t)}
    assert matrix.retried == expected_retries
    # The retries' messages name the tenant they were made for.
    sent = []
    while received := await queue.receive(max_messages=50, max_wait=0):
        sent += [parse_message(m.body) for m in received]
    assert sorted((m.tenant_id, m.job_id) for m in sent) == sorted(expected_retries)


def test_the_matrix_covers_every_endpoint_caller_and_target() -> None:
    assert MATRIX_SIZE == len(TARGETED) * len(CALLERS) * len(TARGETS) + len(UNTARGETED) * len(CALLERS) == 120


# -- the store layer -----------------------------------------------------------------------------


async def seed_pair(store: JobStore) -> tuple[Job, Job]:
    """job-1 in both tenants, told apart by shard id."""
    a = await store.create(job(A, "job-1", S.PENDING, 1))
    b = await store.create(job(B, "job-1", S.PENDING, 2))
    return a, b


async def test_the_same_job_id_in_two_tenants_is_two_jobs(store: JobStore) -> None:
    a, b = await seed_pair(store)
    assert (a.tenant_id, a.shard_id) == (A, f"{A}-shard-job-1")
    # Creating B's job-1 found no job of that id in B, whatever A holds.
    assert (b.tenant_id, b.shard_id) == (B, f"{B}-shard-job-1")
    assert (await store.get(A, "job-1")).to_json() == a.to_json()
    assert (await store.get(B, "job-1")).to_json() == b.to_json()
    with pytest.raises(JobNotFoundError):
        await store.get(C, "job-1")


async def test_a_transition_changes_only_its_own_tenants_job_and_counters(store: JobStore) -> None:
    _, b = await seed_pair(store)
    await store.transition(A, "job-1", S.PENDING, S.PROCESSING)
    await store.transition(A, "job-1", S.PROCESSING, S.COMPLETED)
    done = await store.get(A, "job-1")
    assert (done.tenant_id, done.status) == (A, S.COMPLETED)
    assert (await store.get(B, "job-1")).to_json() == b.to_json()
    assert await store.stats(A) == {**empty_stats(), S.COMPLETED: 1}
    assert await store.stats(B) == {**empty_stats(), S.PENDING: 1}
    # A transition in a tenant without the job finds nothing, though another tenant has that id.
    await store.create(job(B, "only-b", S.PENDING, 3))
    with pytest.raises(JobNotFoundError):
        await store.transition(A, "only-b", S.PENDING, S.PROCESSING)
    with pytest.raises(JobNotFoundError):
        await store.transition(C, "job-1", S.PENDING, S.PROCESSING)
    assert (await store.get(B, "only-b")).status is S.PENDING
    assert await store.stats(B) == {**empty_stats(), S.PENDING: 2}
    assert await store.stats(C) == empty_stats()


async def test_list_stats_stuck_and_recount_of_a_tenant_see_only_its_jobs(store: JobStore) -> None:
    await seed_pair(store)
    await store.create(job(A, "job-2", S.FAILED, 3))
    await store.create(job(B, "job-2", S.PENDING, 4))
    await store.create(job(B, "job-3", S.PENDING, 5))

    listed = (await store.list(A)).items
    assert sorted((j.tenant_id, j.id, j.shard_id) for j in listed) == [
        (A, "job-1", f"{A}-shard-job-1"),
        (A, "job-2", f"{A}-shard-job-2"),
    ]
    assert [j.id for j in (await store.list(A, status=S.PENDING)).items] == ["job-1"]
    assert [j.id for j in (await store.list(B, status=S.FAILED)).items] == []
    assert (await store.list(C)).items == []
    assert await store.stats(A) == {**empty_stats(), S.PENDING: 1, S.FAILED: 1}
    assert await store.stats(B) == {**empty_stats(), S.PENDING: 3}
    assert await store.stats_all() == {
        A: {**empty_stats(), S.PENDING: 1, S.FAILED: 1},
        B: {**empty_stats(), S.PENDING: 3},
    }
    # Seeded in 2024: every pending job is stuck, counted in its own tenant only.
    stuck = {(s.tenant_id, s.status): s.count for s in await store.stuck(timedelta(minutes=1))}
    assert stuck == {(A, S.PENDING): 1, (B, S.PENDING): 3}
    assert await store.recount(A) == {A: {**empty_stats(), S.PENDING: 1, S.FAILED: 1}}
    assert await store.stats(B) == {**empty_stats(), S.PENDING: 3}

    # A continuation token of one tenant's listing does not page through another's.
    page = await store.list(B, limit=1)
    assert page.continuation is not None
    with pytest.raises(InvalidContinuationError):
        await store.list(A, limit=1, continuation=page.continuation)


async def test_a_purge_of_one_tenant_leaves_the_others_finished_jobs(store: JobStore) -> None:
    await store.create(job(A, "job-1", S.COMPLETED, 1))
    await store.create(job(B, "job-1", S.COMPLETED, 2))
    assert await store.purge(timedelta(days=1), tenant_id=A) == 1
    with pytest.raises(JobNotFoundError):
        await store.get(A, "job-1")
    assert (await store.get(B, "job-1")).shard_id == f"{B}-shard-job-1"
    assert await store.stats(A) == empty_stats()
    assert await store.stats(B) == {**empty_stats(), S.COMPLETED: 1}
