"""The job record, its statuses and the only legal transitions between them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from jobs.errors import IllegalTransitionError, InvalidJobError, InvalidTenantError

TENANT_ID_MAX_LENGTH = 64
ID_MAX_LENGTH = 128
# Letters, digits, dash, underscore and dot: safe in Prometheus labels, URLs,
# Cosmos partition keys and log lines without escaping.
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class JobStatus(StrEnum):
    """Lifecycle status of an embedding job."""

    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    DEAD_LETTERED = "dead_lettered"


S = JobStatus
TRANSITIONS: Mapping[JobStatus, frozenset[JobStatus]] = {
    S.PENDING: frozenset({S.PROCESSING, S.DEAD_LETTERED}),
    # processing -> processing is a redelivery after a crash: idempotent.
    S.PROCESSING: frozenset({S.COMPLETED, S.FAILED, S.DEAD_LETTERED, S.PROCESSING}),
    S.FAILED: frozenset({S.PROCESSING, S.DEAD_LETTERED, S.PENDING}),
    S.DEAD_LETTERED: frozenset({S.PENDING}),
    S.COMPLETED: frozenset(),
}
TERMINAL: frozenset[JobStatus] = frozenset({S.COMPLETED, S.DEAD_LETTERED})
ERROR_MAX_LENGTH = 2000


def check_transition(from_status: JobStatus, to_status: JobStatus) -> None:
    """Raise IllegalTransitionError unless from_status -> to_status is legal."""
    if to_status not in TRANSITIONS[from_status]:
        raise IllegalTransitionError(from_status.value, to_status.value)


def validate_tenant_id(tenant_id: object) -> str:
    """Return tenant_id if it is a safe, bounded identifier; raise InvalidTenantError if not."""
    if not isinstance(tenant_id, str) or not tenant_id:
        raise InvalidTenantError("tenant id must be a non-empty string")
    if len(tenant_id) > TENANT_ID_MAX_LENGTH:
        raise InvalidTenantError(f"tenant id is {len(tenant_id)} characters; at most {TENANT_ID_MAX_LENGTH} allowed")
    if not SAFE_ID.match(tenant_id):
        raise InvalidTenantError(
            f"tenant id {tenant_id[:TENANT_ID_MAX_LENGTH]!r} may contain only letters, digits, "
            "'.', '_' and '-', and must start with a letter or digit"
        )
    return tenant_id


def validate_id(value: object, what: str) -> str:
    """Return value if it is a safe, bounded identifier; raise InvalidJobError if not."""
    if not isinstance(value, str) or not value:
        raise InvalidJobError(f"{what} must be a non-empty string")
    if len(value) > ID_MAX_LENGTH or not SAFE_ID.match(value):
        raise InvalidJobError(f"{what} must be at most {ID_MAX_LENGTH} characters of letters, digits, '.', '_' and '-'")
    return value


def utcnow() -> datetime:
    """The current time, timezone-aware UTC, millisecond precision."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def format_time(value: datetime) -> str:
    """ISO-8601 UTC with milliseconds and a Z suffix, as the original records carry."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def parse_time(value: str) -> datetime:
    """Parse an ISO-8601 timestamp into an aware UTC datetime."""
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (ValueError, AttributeError) as exc:
        raise InvalidJobError(f"not an ISO-8601 timestamp: {value!r}") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class JobMetadata:
    """What a completed attempt produced."""

    embedding_model: str | None = None
    vector_count: int | None = None
    processing_time_ms: float | None = None
    chunk_count: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.embedding_model is not None:
            out["embeddingModel"] = self.embedding_model
        if self.vector_count is not None:
            out["vectorCount"] = self.vector_count
        if self.processing_time_ms is not None:
            out["processingTimeMs"] = self.processing_time_ms
        if self.chunk_count is not None:
            out["chunkCount"] = self.chunk_count
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JobMetadata:
        return cls(
            embedding_model=data.get("embeddingModel"),
            vector_count=data.get("vectorCount"),
            processing_time_ms=data.get("processingTimeMs"),
            chunk_count=data.get("chunkCount"),
        )


@dataclass(frozen=True, slots=True)
class Job:
    """One embedding job: a shard of one tenant turned into vectors."""

    id: str
    tenant_id: str
    shard_id: str
    shard_type_id: str
    status: JobStatus = JobStatus.PENDING
    retry_count: int = 0
    error: str | None = None
    created_at: datetime = field(default_factory=utcnow)
    updated_at: datetime = field(default_factory=utcnow)
    completed_at: datetime | None = None
    trace_id: str | None = None
    metadata: JobMetadata = field(default_factory=JobMetadata)

    def __post_init__(self) -> None:
        validate_id(self.id, "job id")
        validate_tenant_id(self.tenant_id)
        validate_id(self.shard_id, "shard id")
        validate_id(self.shard_type_id, "shard type id")
        if self.retry_count < 0:
            raise InvalidJobError("retryCount must not be negative")

    @classmethod
    def new(
        cls,
        *,
        job_id: str,
        tenant_id: str,
        shard_id: str,
        shard_type_id: str,
        status: JobStatus = JobStatus.PENDING,
        trace_id: str | None = None,
    ) -> Job:
        """A fresh job record stamped with the current time."""
        now = utcnow()
        return cls(
            id=job_id,
            tenant_id=tenant_id,
            shard_id=shard_id,
            shard_type_id=shard_type_id,
            status=status,
            created_at=now,
            updated_at=now,
            trace_id=trace_id,
        )

    def with_changes(self, **changes: Any) -> Job:
        """A copy with the given attributes replaced."""
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The camelCase JSON record, omitting optional fields that are unset."""
        out: dict[str, Any] = {
            "id": self.id,
            "tenantId": self.tenant_id,
            "shardId": self.shard_id,
            "shardTypeId": self.shard_type_id,
            "status": self.status.value,
            "retryCount": self.retry_count,
            "createdAt": format_time(self.created_at),
            "updatedAt": format_time(self.updated_at),
            "metadata": self.metadata.to_json(),
        }
        if self.error is not None:
            out["error"] = self.error
        if self.completed_at is not None:
            out["completedAt"] = format_time(self.completed_at)
        if self.trace_id is not None:
            out["traceId"] = self.trace_id
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Job:
        """Parse a camelCase JSON record; raise InvalidJobError on a malformed one."""
        try:
            status = JobStatus(data["status"])
            completed = data.get("completedAt")
            return cls(
                id=data["id"],
                tenant_id=data["tenantId"],
                shard_id=data["shardId"],
                shard_type_id=data["shardTypeId"],
                status=status,
                retry_count=int(data.get("retryCount", 0)),
                error=data.get("error"),
                created_at=parse_time(data["createdAt"]),
                updated_at=parse_time(data["updatedAt"]),
                completed_at=parse_time(completed) if completed else None,
                trace_id=data.get("traceId"),
                metadata=JobMetadata.from_json(data.get("metadata") or {}),
            )
        except KeyError as exc:
            raise InvalidJobError(f"job record lacks field {exc.args[0]!r}") from exc
        except (TypeError, ValueError) as exc:
            if isinstance(exc, InvalidJobError):
                raise
            raise InvalidJobError(f"malformed job record: {exc}") from exc


def truncate_error(message: str) -> str:
    """Bound an error message so one bad shard cannot bloat its record."""
    if len(message) <= ERROR_MAX_LENGTH:
        return message
    return message[: ERROR_MAX_LENGTH - 1] + "…"
