"""The job record, its JSON form, tenant validation and the transition table."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from jobs.errors import IllegalTransitionError, InvalidJobError, InvalidTenantError
from jobs.model import (
    TRANSITIONS,
    Job,
    JobMetadata,
    JobStatus,
    check_transition,
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
        "id", "tenantId", "shardId", "shardTypeId", "status", "retryCount", "createdAt", "updatedAt",
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
