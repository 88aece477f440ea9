"""The job record, its statuses and the only legal transitions between them."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
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
    # On every write: isoformat is about twice as fast as strftime, and zero-pads years below 1000.
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return value.isoformat(timespec="milliseconds")[:-6] + "Z"


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


_ATTRIBUTES = (
    "id",
    "tenant_id",
    "shard_id",
    "shard_type_id",
    "status",
    "retry_count",
    "error",
    "created_at",
    "updated_at",
    "completed_at",
    "trace_id",
    "metadata",
)


class Job:
    """One embedding job: a shard of one tenant turned into vectors; immutable.

    A job is its camelCase JSON record. A job read from a store may hold that record as the
    store's own JSON text and decode it only when a field is read, so the API can answer with
    the stored text as it is: no parse_time/format_time round trip per field on the read path.
    """

    __slots__ = ("_record", "_text")

    _record: dict[str, Any] | None
    _text: str | None

    def __init__(
        self,
        id: str,
        tenant_id: str,
        shard_id: str,
        shard_type_id: str,
        status: JobStatus = JobStatus.PENDING,
        retry_count: int = 0,
        error: str | None = None,
        created_at: datetime | None = None,
        updated_at: datetime | None = None,
        completed_at: datetime | None = None,
        trace_id: str | None = None,
        metadata: JobMetadata | None = None,
    ) -> None:
        validate_id(id, "job id")
        validate_tenant_id(tenant_id)
        validate_id(shard_id, "shard id")
        validate_id(shard_type_id, "shard type id")
        if retry_count < 0:
            raise InvalidJobError("retryCount must not be negative")
        if created_at is None or updated_at is None:
            now = utcnow()
            created_at = created_at or now
            updated_at = updated_at or now
        record: dict[str, Any] = {
            "id": id,
            "tenantId": tenant_id,
            "shardId": shard_id,
            "shardTypeId": shard_type_id,
            "status": JobStatus(status).value,
            "retryCount": retry_count,
            "createdAt": format_time(created_at),
            "updatedAt": format_time(updated_at),
            "metadata": (metadata or JobMetadata()).to_json(),
        }
        if error is not None:
            record["error"] = error
        if completed_at is not None:
            record["completedAt"] = format_time(completed_at)
        if trace_id is not None:
            record["traceId"] = trace_id
        self._record = record
        self._text = None

    @classmethod
    def from_stored_json(cls, text: str) -> Job:
        """A job from the JSON text of a record its store wrote (validated then): kept as given, decoded lazily."""
        job = cls.__new__(cls)
        job._record = None
        job._text = text
        return job

    def _fields(self) -> dict[str, Any]:
        record = self._record
        if record is None:
            assert self._text is not None
            record = self._record = json.loads(self._text)
        return record

    # -- the fields -------------------------------------------------------------------

    @property
    def id(self) -> str:
        """The job id, unique within its tenant."""
        return str(self._fields()["id"])

    @property
    def tenant_id(self) -> str:
        """The tenant the job belongs to."""
        return str(self._fields()["tenantId"])

    @property
    def shard_id(self) -> str:
        """The shard the job embeds."""
        return str(self._fields()["shardId"])

    @property
    def shard_type_id(self) -> str:
        """The kind of shard."""
        return str(self._fields()["shardTypeId"])

    @property
    def status(self) -> JobStatus:
        """Where the job is in its lifecycle."""
        return JobStatus(self._fields()["status"])

    @property
    def retry_count(self) -> int:
        """Attempts made after the first."""
        return int(self._fields()["retryCount"])

    @property
    def error(self) -> str | None:
        """The last attempt's error, if any."""
        value = self._fields().get("error")
        return None if value is None else str(value)

    @property
    def created_at(self) -> datetime:
        """When the job was created (UTC, milliseconds)."""
        return parse_time(self._fields()["createdAt"])

    @property
    def updated_at(self) -> datetime:
        """When the job last changed (UTC, milliseconds)."""
        return parse_time(self._fields()["updatedAt"])

    @property
    def completed_at(self) -> datetime | None:
        """When the job reached completed or dead_lettered; None while it is not finished."""
        value = self._fields().get("completedAt")
        return parse_time(value) if value else None

    @property
    def trace_id(self) -> str | None:
        """The trace of the attempt that last touched the job."""
        value = self._fields().get("traceId")
        return None if value is None else str(value)

    @property
    def metadata(self) -> JobMetadata:
        """What the completed attempt produced."""
        return JobMetadata.from_json(self._fields().get("metadata") or {})

    # -- values -----------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Job):
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        record = self._fields()
        return hash((record["tenantId"], record["id"], record["status"], record["updatedAt"]))

    def __repr__(self) -> str:
        return f"Job({', '.join(f'{name}={getattr(self, name)!r}' for name in _ATTRIBUTES)})"

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
        unknown = set(changes) - set(_ATTRIBUTES)
        if unknown:
            raise TypeError(f"Job has no attribute(s) {', '.join(sorted(unknown))}")
        values = {name: getattr(self, name) for name in _ATTRIBUTES}
        return Job(**{**values, **changes})

    def to_json(self) -> dict[str, Any]:
        """The camelCase JSON record, omitting optional fields that are unset; a fresh copy."""
        record = self._fields()
        return {**record, "metadata": dict(record.get("metadata") or {})}

    def to_json_text(self) -> str:
        """The record as compact JSON text: for a stored job, the store's own text, undecoded."""
        if self._text is None:
            self._text = json.dumps(self._fields(), separators=(",", ":"))
        return self._text

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Job:
        """Parse a camelCase JSON record, validating it; raise InvalidJobError on a malformed one."""
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


def truncate_error(message: str, limit: int = ERROR_MAX_LENGTH) -> str:
    """Bound an error message to limit characters, marking a cut with "…", so one bad shard cannot bloat a record."""
    if len(message) <= limit:
        return message
    return message[: limit - 1] + "…"
