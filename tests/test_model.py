"""The job record, its JSON form, tenant validation and the transition table."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobs.errors import IllegalTransitionError, InvalidJobError, InvalidTenantError
from jobs.model import (
    TRANSITIONS,
    Job,
    JobMetadata,
    JobStatus,
    check_transition,
    format_time,
    truncate_error,
    validate_tenant_id,
)

S = JobStatus


def test_job_json_round_trip_is_exact() -> None:
    record = {
        "id": "job-1",
        "tenantId": "tenant-a",
        "shardId": "shard-1",
        "shardTypeId": "document",
        "status": "completed",
        "retryCount": 2,
        "error": "embedder returned 503",
        "createdAt": "2026-01-02T03:04:05.006Z",
        "updatedAt": "2026-01-02T03:04:06.007Z",
        "completedAt": "2026-01-02T03:04:06.007Z",
        "traceId": "0af7651916cd43dd8448eb211c80319c",
        "metadata": {
            "embeddingModel": "hashing-256",
            "vectorCount": 3,
            "processingTimeMs": 12.5,
            "chunkCount": 3,
        },
    }
    assert Job.from_json(record).to_json() == record


def test_optional_fields_are_omitted_from_json() -> None:
    job = Job.new(job_id="j", tenant_id="t", shard_id="s", shard_type_id="doc")
    data = job.to_json()
    assert set(data) == {
        "id",
        "tenantId",
        "shardId",
        "shardTypeId",
        "status",
        "retryCount",
        "createdAt",
        "updatedAt",
        "metadata",
    }
    assert data["metadata"] == {}
    assert data["createdAt"].endswith("Z")


def test_from_json_names_the_missing_field() -> None:
    with pytest.raises(InvalidJobError, match="shardId"):
        Job.from_json({"id": "j", "tenantId": "t", "status": "pending"})


def test_from_json_rejects_unknown_status() -> None:
    job = Job.new(job_id="j", tenant_id="t", shard_id="s", shard_type_id="doc").to_json()
    job["status"] = "exploded"
    with pytest.raises(InvalidJobError):
        Job.from_json(job)


@pytest.mark.parametrize(
    ("tenant", "message"),
    [
        ("", "non-empty"),
        ("a" * 65, "at most 64"),
        ("tenant a", "only letters"),
        ("-leading-dash", "start with"),
        ("x'; DROP TABLE jobs;--", "only letters"),
        (42, "non-empty string"),
    ],
)
def test_invalid_tenant_ids_get_a_clear_error(tenant: object, message: str) -> None:
    with pytest.raises(InvalidTenantError, match=message):
        validate_tenant_id(tenant)


def test_valid_tenant_ids_pass() -> None:
    for tenant in ("a", "tenant-1", "Tenant_2.prod", "a" * 64):
        assert validate_tenant_id(tenant) == tenant


def test_transition_table_matches_the_lifecycle() -> None:
    legal = {(a, b) for a, targets in TRANSITIONS.items() for b in targets}
    assert legal == {
        (S.PENDING, S.PROCESSING),
        (S.PROCESSING, S.COMPLETED),
        (S.PROCESSING, S.FAILED),
        (S.PROCESSING, S.DEAD_LETTERED),
        (S.PROCESSING, S.PROCESSING),
        (S.FAILED, S.PROCESSING),
        (S.PENDING, S.DEAD_LETTERED),
        (S.FAILED, S.DEAD_LETTERED),
        (S.FAILED, S.PENDING),
        (S.DEAD_LETTERED, S.PENDING),
    }


@pytest.mark.parametrize(
    ("a", "b"),
    [(S.COMPLETED, S.PENDING), (S.COMPLETED, S.PROCESSING), (S.PENDING, S.COMPLETED), (S.PENDING, S.FAILED)],
)
def test_illegal_transitions_raise_typed_error(a: JobStatus, b: JobStatus) -> None:
    with pytest.raises(IllegalTransitionError) as info:
        check_transition(a, b)
    assert (info.value.from_status, info.value.to_status) == (a.value, b.value)


def test_long_errors_are_truncated() -> None:
    assert len(truncate_error("x" * 10_000)) == 2000
    assert truncate_error("short") == "short"


def test_times_are_utc() -> None:
    job = Job.new(job_id="j", tenant_id="t", shard_id="s", shard_type_id="doc")
    assert job.created_at.tzinfo is not None
    assert job.created_at.utcoffset() == datetime.now(UTC).utcoffset()
    assert JobMetadata().to_json() == {}


def _strftime_format_time(value: datetime) -> str:
    """format_time as it was first written (strftime), the reference for the faster one."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


# Real zones and whole-second fixed offsets: with a sub-second offset the reference took the
# milliseconds from the local time, not from the UTC one. Years from 1000 on: below that,
# strftime's %Y is not zero-padded on glibc, so the reference was not ISO-8601 there.
_OFFSETS = st.integers(min_value=-86_399, max_value=86_399).map(lambda s: timezone(timedelta(seconds=s)))


@given(
    st.datetimes(
        min_value=datetime(1000, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.one_of(st.timezones(), _OFFSETS, st.just(UTC)),
    )
)
def test_format_time_equals_the_strftime_reference_for_aware_datetimes(value: datetime) -> None:
    assert format_time(value) == _strftime_format_time(value)


def test_format_time_zero_pads_early_years() -> None:
    assert format_time(datetime(987, 6, 5, 4, 3, 2, 1999, tzinfo=UTC)) == "0987-06-05T04:03:02.001Z"


def test_stored_job_serialises_as_the_stored_text_and_reads_its_fields() -> None:
    job = Job(
        id="job-1",
        tenant_id="tenant-a",
        shard_id="shard-1",
        shard_type_id="doc",
        status=S.FAILED,
        retry_count=2,
        error="é\nboom",
        created_at=datetime(2026, 1, 2, 3, 4, 5, 6000, tzinfo=UTC),
        updated_at=datetime(2026, 1, 2, 3, 4, 6, 7000, tzinfo=UTC),
        metadata=JobMetadata(embedding_model="m", vector_count=3, processing_time_ms=0.30000000000000004),
    )
    text = json.dumps(job.to_json(), ensure_ascii=False)
    stored = Job.from_stored_json(text)
    assert stored.to_json_text() is text
    assert stored == job
    assert hash(stored) == hash(job)
    assert (stored.status, stored.retry_count, stored.error) == (S.FAILED, 2, "é\nboom")
    assert stored.updated_at == datetime(2026, 1, 2, 3, 4, 6, 7000, tzinfo=UTC)
    assert stored.completed_at is None
    assert stored.metadata.processing_time_ms == 0.30000000000000004
    assert json.loads(job.to_json_text()) == job.to_json()


def test_to_json_returns_a_copy_the_caller_may_change() -> None:
    job = Job.new(job_id="j", tenant_id="t", shard_id="s", shard_type_id="doc")
    data = job.to_json()
    data["status"] = "completed"
    data["metadata"]["vectorCount"] = 9
    assert job.status is S.PENDING
    assert job.to_json()["metadata"] == {}


def test_with_changes_validates_and_refuses_unknown_attributes() -> None:
    job = Job.new(job_id="j", tenant_id="t", shard_id="s", shard_type_id="doc")
    assert job.with_changes(status=S.PROCESSING, retry_count=1).to_json() == {
        **job.to_json(),
        "status": "processing",
        "retryCount": 1,
    }
    with pytest.raises(InvalidTenantError):
        job.with_changes(tenant_id="bad tenant")
    with pytest.raises(TypeError, match="colour"):
        job.with_changes(colour="red")


def test_fields_cannot_be_assigned() -> None:
    job = Job.new(job_id="j", tenant_id="t", shard_id="s", shard_type_id="doc")
    with pytest.raises(AttributeError):
        job.status = S.COMPLETED  # type: ignore[misc]
