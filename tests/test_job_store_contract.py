"""The JobStore contract: every backend runs these same tests through the `store` fixture."""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta

import pytest

from jobs.errors import (
    IllegalTransitionError,
    InvalidContinuationError,
    InvalidTenantError,
    JobNotFoundError,
    TransitionConflictError,
)
from jobs.model import TRANSITIONS, Job, JobMetadata, JobStatus, utcnow
from jobs.store import JobStore, empty_stats

S = JobStatus


def make_job(tenant: str = "tenant-a", n: int = 1, **changes: object) -> Job:
    job = Job.new(job_id=f"job-{n}", tenant_id=tenant, shard_id=f"shard-{n}", shard_type_id="document")
    return job.with_changes(**changes) if changes else job


async def test_create_then_get_returns_the_same_record(store: JobStore) -> None:
    job = make_job(trace_id="4bf92f3577b34da6a3ce929d0e0e4736")
    assert await store.create(job) == job
    assert (await store.get("tenant-a", "job-1")).to_json() == job.to_json()


async def test_create_is_idempotent_for_the_same_id(store: JobStore) -> None:
    first = make_job()
    await store.create(first)
    await store.transition("tenant-a", "job-1", S.PENDING, S.PROCESSING)
    again = await store.create(make_job(shard_id="other-shard"))
    assert again.status is S.PROCESSING
    assert again.shard_id == first.shard_id
    stats = await store.stats("tenant-a")
    assert stats[S.PROCESSING] == 1
    assert sum(stats.values()) == 1


async def test_transition_updates_job_and_counters(store: JobStore) -> None:
    await store.create(make_job())
    await store.transition("tenant-a", "job-1", S.PENDING, S.PROCESSING, trace_id="abc123")
    processing = await store.get("tenant-a", "job-1")
    assert processing.status is S.PROCESSING
    assert processing.trace_id == "abc123"
    assert processing.completed_at is None
    metadata = JobMetadata(embedding_model="hashing-256", vector_count=4, processing_time_ms=8.0, chunk_count=4)
    await store.transition("tenant-a", "job-1", S.PROCESSING, S.COMPLETED, metadata=metadata, error=None)
    done = await store.get("tenant-a", "job-1")
    assert done.status is S.COMPLETED
    assert done.metadata == metadata
    assert done.completed_at is not None
    assert done.updated_at >= processing.updated_at
    stats = await store.stats("tenant-a")
    assert stats == {**empty_stats(), S.COMPLETED: 1}


async def test_failed_attempt_records_error_and_retry_count(store: JobStore) -> None:
    await store.create(make_job())
    await store.transition("tenant-a", "job-1", S.PENDING, S.PROCESSING)
    await store.transition("tenant-a", "job-1", S.PROCESSING, S.FAILED, error="embedder returned 503", retry_count=1)
    failed = await store.get("tenant-a", "job-1")
    assert (failed.status, failed.error, failed.retry_count) == (S.FAILED, "embedder returned 503", 1)
    await store.transition("tenant-a", "job-1", S.FAILED, S.PROCESSING)
    retried = await store.get("tenant-a", "job-1")
    assert retried.error == "embedder returned 503"
    assert retried.retry_count == 1


async def test_manual_retry_reopens_a_dead_lettered_job(store: JobStore) -> None:
    await store.create(make_job())
    await store.transition("tenant-a", "job-1", S.PENDING, S.DEAD_LETTERED, error="gave up")
    dead = await store.get("tenant-a", "job-1")
    assert dead.completed_at is not None
    await store.transition("tenant-a", "job-1", S.DEAD_LETTERED, S.PENDING, retry_count=0)
    reopened = await store.get("tenant-a", "job-1")
    assert reopened.status is S.PENDING
    assert reopened.completed_at is None
    assert reopened.retry_count == 0


async def test_illegal_transition_raises_and_changes_nothing(store: JobStore) -> None:
    await store.create(make_job())
    await store.transition("tenant-a", "job-1", S.PENDING, S.PROCESSING)
    await store.transition("tenant-a", "job-1", S.PROCESSING, S.COMPLETED)
    before = await store.get("tenant-a", "job-1")
    with pytest.raises(IllegalTransitionError):
        await store.transition("tenant-a", "job-1", S.COMPLETED, S.PROCESSING)
    assert await store.get("tenant-a", "job-1") == before
    assert (await store.stats("tenant-a"))[S.COMPLETED] == 1


async def test_transition_from_a_stale_status_is_a_conflict(store: JobStore) -> None:
    await store.create(make_job())
    await store.transition("tenant-a", "job-1", S.PENDING, S.PROCESSING)
    with pytest.raises(TransitionConflictError) as info:
        await store.transition("tenant-a", "job-1", S.PENDING, S.PROCESSING)
    assert (info.value.expected, info.value.actual) == ("pending", "processing")
    assert (await store.stats("tenant-a"))[S.PROCESSING] == 1
    assert (await store.stats("tenant-a"))[S.PENDING] == 0


async def test_redelivery_transition_processing_to_processing_keeps_counts(store: JobStore) -> None:
    await store.create(make_job())
    await store.transition("tenant-a", "job-1", S.PENDING, S.PROCESSING)
    await store.transition("tenant-a", "job-1", S.PROCESSING, S.PROCESSING, retry_count=1)
    assert (await store.get("tenant-a", "job-1")).retry_count == 1
    assert (await store.stats("tenant-a"))[S.PROCESSING] == 1


async def test_missing_job_raises_not_found(store: JobStore) -> None:
    with pytest.raises(JobNotFoundError):
        await store.get("tenant-a", "nope")
    with pytest.raises(JobNotFoundError):
        await store.transition("tenant-a", "nope", S.PENDING, S.PROCESSING)


async def test_concurrent_transitions_of_one_job_have_exactly_one_winner(store: JobStore) -> None:
    await store.create(make_job())
    results = await asyncio.gather(
        *(store.transition("tenant-a", "job-1", S.PENDING, S.PROCESSING) for _ in range(40)),
        return_exceptions=True,
    )
    winners = [r for r in results if r is None]
    losers = [r for r in results if isinstance(r, TransitionConflictError)]
    assert len(winners) == 1
    assert len(losers) == 39
    assert (await store.stats("tenant-a")) == {**empty_stats(), S.PROCESSING: 1}


async def test_counters_equal_a_recount_after_a_random_workload(store: JobStore) -> None:
    rng = random.Random(20261130)
    tenants = ["t1", "t2", "t3", "t4"]
    model: dict[tuple[str, str], JobStatus] = {}
    for n in range(120):
        tenant = rng.choice(tenants)
        await store.create(make_job(tenant, n))
        model[(tenant, f"job-{n}")] = S.PENDING
    keys = sorted(model)
    applied = refused = 0
    for _ in range(2500):
        tenant, job_id = rng.choice(keys)
        current = model[(tenant, job_id)]
        target = rng.choice(list(JobStatus))
        # Sometimes claim a wrong source status to exercise the conflict path.
        claimed = current if rng.random() < 0.85 else rng.choice(list(JobStatus))
        try:
            await store.transition(tenant, job_id, claimed, target)
        except (IllegalTransitionError, TransitionConflictError):
            refused += 1
            assert claimed != current or target not in TRANSITIONS[current]
            continue
        assert claimed == current
        assert target in TRANSITIONS[current]
        model[(tenant, job_id)] = target
        applied += 1
    assert applied > 500
    assert refused > 500
    expected: dict[str, dict[JobStatus, int]] = {t: empty_stats() for t in tenants}
    for (tenant, _), status in model.items():
        expected[tenant][status] += 1
    counted = await store.stats_all()
    assert counted == expected
    assert await store.recount() == expected
    assert await store.stats_all() == expected


async def test_recount_repairs_counters(store: JobStore) -> None:
    for n in range(5):
        await store.create(make_job(n=n))
    await store.transition("tenant-a", "job-0", S.PENDING, S.PROCESSING)
    assert await store.recount("tenant-a") == {"tenant-a": {**empty_stats(), S.PENDING: 4, S.PROCESSING: 1}}
    assert await store.stats("tenant-a") == {**empty_stats(), S.PENDING: 4, S.PROCESSING: 1}


async def test_paging_returns_every_job_exactly_once_newest_first(store: JobStore) -> None:
    base = utcnow() - timedelta(hours=1)
    for n in range(23):
        # Several jobs share a timestamp so the id tie-break is exercised.
        at = base + timedelta(seconds=n // 3)
        await store.create(make_job(n=n, created_at=at, updated_at=at))
    seen: list[Job] = []
    token: str | None = None
    pages = 0
    while True:
        page = await store.list("tenant-a", limit=5, continuation=token)
        seen.extend(page.items)
        pages += 1
        # Jobs created while paging are newer than the cursor and never shift later pages.
        await store.create(make_job(n=1000 + pages))
        token = page.continuation
        if token is None:
            break
    ids = [job.id for job in seen]
    assert sorted(ids) == sorted(f"job-{n}" for n in range(23))
    assert len(set(ids)) == 23
    keys = [(job.created_at, job.id) for job in seen]
    assert keys == sorted(keys, reverse=True)
    assert pages == 5


async def test_list_filters_by_status(store: JobStore) -> None:
    for n in range(6):
        await store.create(make_job(n=n))
    for n in (1, 3):
        await store.transition("tenant-a", f"job-{n}", S.PENDING, S.PROCESSING)
    page = await store.list("tenant-a", status=S.PROCESSING, limit=10)
    assert sorted(job.id for job in page.items) == ["job-1", "job-3"]
    assert page.continuation is None


async def test_continuation_token_is_bound_to_its_query(store: JobStore) -> None:
    for n in range(4):
        await store.create(make_job(n=n))
        await store.create(make_job("tenant-b", n=n))
    page = await store.list("tenant-a", limit=2)
    assert page.continuation is not None
    with pytest.raises(InvalidContinuationError):
        await store.list("tenant-b", limit=2, continuation=page.continuation)
    with pytest.raises(InvalidContinuationError):
        await store.list("tenant-a", status=S.PENDING, limit=2, continuation=page.continuation)
    with pytest.raises(InvalidContinuationError):
        await store.list("tenant-a", limit=2, continuation="not-a-token!")


async def test_tenant_a_never_sees_tenant_b(store: JobStore) -> None:
    await store.create(make_job("tenant-b", n=7))
    with pytest.raises(JobNotFoundError):
        await store.get("tenant-a", "job-7")
    with pytest.raises(JobNotFoundError):
        await store.transition("tenant-a", "job-7", S.PENDING, S.PROCESSING)
    assert (await store.list("tenant-a")).items == []
    assert await store.stats("tenant-a") == empty_stats()
    assert (await store.get("tenant-b", "job-7")).status is S.PENDING
    # The same job id may exist independently in two tenants.
    await store.create(make_job("tenant-a", n=7))
    await store.transition("tenant-a", "job-7", S.PENDING, S.PROCESSING)
    assert (await store.get("tenant-b", "job-7")).status is S.PENDING


async def test_invalid_tenant_is_refused(store: JobStore) -> None:
    with pytest.raises(InvalidTenantError):
        await store.stats("bad tenant")
    with pytest.raises(InvalidTenantError):
        await store.list("")


async def test_stuck_counts_old_pending_and_processing_jobs(store: JobStore) -> None:
    old = utcnow() - timedelta(hours=2)
    for n in range(3):
        await store.create(make_job(n=n, created_at=old, updated_at=old))
    await store.create(make_job("tenant-b", n=9, created_at=old, updated_at=old))
    await store.create(make_job(n=5))  # fresh: not stuck
    await store.transition("tenant-a", "job-0", S.PENDING, S.PROCESSING)  # touched now: not stuck
    stuck = await store.stuck(timedelta(minutes=30))
    summary = {(s.tenant_id, s.status, s.count) for s in stuck}
    assert summary == {("tenant-a", S.PENDING, 2), ("tenant-b", S.PENDING, 1)}
    assert all(s.oldest_updated_at <= old + timedelta(seconds=1) for s in stuck)


async def test_purge_deletes_only_old_finished_jobs_and_keeps_counters_true(store: JobStore) -> None:
    for n in range(4):
        await store.create(make_job(n=n))
    for n in range(3):
        await store.transition("tenant-a", f"job-{n}", S.PENDING, S.PROCESSING)
    await store.transition("tenant-a", "job-0", S.PROCESSING, S.COMPLETED)
    await store.transition("tenant-a", "job-1", S.PROCESSING, S.DEAD_LETTERED)
    assert await store.purge(timedelta(hours=1)) == 0
    assert await store.purge(timedelta(seconds=-1), tenant_id="tenant-b") == 0
    assert await store.purge(timedelta(seconds=-1)) == 2
    with pytest.raises(JobNotFoundError):
        await store.get("tenant-a", "job-0")
    expected = {**empty_stats(), S.PROCESSING: 1, S.PENDING: 1}
    assert await store.stats("tenant-a") == expected
    assert await store.recount("tenant-a") == {"tenant-a": expected}


async def test_stats_all_covers_every_tenant(store: JobStore) -> None:
    for n, tenant in enumerate(["a", "b", "c"]):
        for m in range(n + 1):
            await store.create(make_job(tenant, n=m))
    stats = await store.stats_all()
    assert {t: s[S.PENDING] for t, s in stats.items()} == {"a": 1, "b": 2, "c": 3}


async def test_ping_succeeds_on_a_live_store(store: JobStore) -> None:
    await store.ping()
