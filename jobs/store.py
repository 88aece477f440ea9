"""The JobStore protocol every backend implements, and the values it returns."""

from __future__ import annotations

import base64
import builtins
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, Protocol

from jobs import strict_json
from jobs.errors import InvalidContinuationError, InvalidJobError
from jobs.model import Job, JobMetadata, JobStatus, parse_time, validate_id


class _Unset:
    """Marker for 'leave this field as it is' (None means 'clear it')."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = _Unset()

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


@dataclass(frozen=True, slots=True)
class Page:
    """One page of jobs, newest first, and the token for the next page (None on the last)."""

    items: Sequence[Job]
    continuation: str | None


@dataclass(frozen=True, slots=True)
class StuckJobs:
    """How many jobs of a tenant sit in one status since before the threshold."""

    tenant_id: str
    status: JobStatus
    count: int
    oldest_updated_at: datetime


TenantStats = Mapping[JobStatus, int]


def empty_stats() -> dict[JobStatus, int]:
    """A zero count for every status."""
    return dict.fromkeys(JobStatus, 0)


# A real token is a few hundred characters; anything far longer is refused before decoding.
CONTINUATION_MAX_LENGTH = 2048
# {"q": {...}, "p": {...}}: two levels, nothing deeper.
_CONTINUATION_DEPTH = 2
# The stores' time format exactly (format_time): what a token's createdAt must look like.
_STORED_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")


@dataclass(frozen=True, slots=True)
class Position:
    """Where a newest-first listing resumes: after the job with this createdAt and id."""

    created_at: str
    job_id: str


def encode_continuation(query: Mapping[str, Any], position: Position) -> str:
    """An opaque token binding a resume position to the query it came from."""
    raw = json.dumps(
        {"q": query, "p": {"c": position.created_at, "i": position.job_id}}, separators=(",", ":"), sort_keys=True
    )
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_continuation(token: str, query: Mapping[str, Any]) -> Position:
    """The resume position in token; InvalidContinuationError if malformed or from another query.

    Tokens are not signed: a token only moves the keyset position within the query it names,
    and every store query is scoped by the caller's tenant and takes the position as
    parameters, so a forged position can show nothing a first page would not. What a token may
    hold is typed strictly instead, so no caller-made value reaches a store query unchecked.
    """
    if not isinstance(token, str) or len(token) > CONTINUATION_MAX_LENGTH:
        raise InvalidContinuationError("malformed continuation token")
    try:
        raw = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
        data = strict_json.loads(raw, max_depth=_CONTINUATION_DEPTH)
    except (ValueError, TypeError) as exc:  # binascii.Error and JSONInputError are ValueErrors
        raise InvalidContinuationError("malformed continuation token") from exc
    if not isinstance(data, dict) or set(data) != {"q", "p"}:
        raise InvalidContinuationError("malformed continuation token")
    if data["q"] != dict(query):
        raise InvalidContinuationError("continuation token belongs to a different query")
    position = data["p"]
    if not isinstance(position, dict) or set(position) != {"c", "i"}:
        raise InvalidContinuationError("malformed continuation token")
    created_at, job_id = position["c"], position["i"]
    if not isinstance(created_at, str) or not _STORED_TIME.fullmatch(created_at) or not _is_time(created_at):
        raise InvalidContinuationError("malformed continuation token: its position is not a stored time")
    try:
        validate_id(job_id, "job id")
    except InvalidJobError as exc:
        raise InvalidContinuationError("malformed continuation token: its position is not a job id") from exc
    return Position(created_at, job_id)


def _is_time(text: str) -> bool:
    try:
        parse_time(text)
    except InvalidJobError:
        return False
    return True


class JobStore(Protocol):
    """Job records with per-tenant counters maintained on every transition."""

    async def create(self, job: Job) -> Job:
        """Insert job; if a job with that id exists in the tenant, return it unchanged."""
        ...

    async def transition(
        self,
        tenant_id: str,
        job_id: str,
        from_status: JobStatus,
        to_status: JobStatus,
        *,
        error: str | _Unset | None = UNSET,
        retry_count: int | None = None,
        metadata: JobMetadata | None = None,
        trace_id: str | None = None,
    ) -> None:
        """Move a job from from_status to to_status and update its tenant's counters atomically.

        IllegalTransitionError if the table forbids it, JobNotFoundError if there is no such
        job, TransitionConflictError if the job is no longer in from_status. Nothing is read
        back: the worker, which makes nearly every transition, never needs the record; a caller
        that does reads it with get().
        """
        ...

    async def get(self, tenant_id: str, job_id: str) -> Job:
        """The job; JobNotFoundError if the tenant has none with that id."""
        ...

    async def list(
        self,
        tenant_id: str,
        status: JobStatus | None = None,
        limit: int = DEFAULT_PAGE_SIZE,
        continuation: str | None = None,
    ) -> Page:
        """A page of the tenant's jobs, newest first, optionally of one status."""
        ...

    async def stats(self, tenant_id: str) -> dict[JobStatus, int]:
        """The tenant's job count per status, read from its counters."""
        ...

    async def stats_all(self) -> dict[str, dict[JobStatus, int]]:
        """Every tenant's counts, read from the counters page by page."""
        ...

    async def stuck(
        self, older_than: timedelta, statuses: Sequence[JobStatus] = (JobStatus.PENDING, JobStatus.PROCESSING)
    ) -> builtins.list[StuckJobs]:
        """Per tenant and status, jobs not updated for longer than older_than."""
        ...

    async def purge(self, older_than: timedelta, tenant_id: str | None = None) -> int:
        """Delete completed and dead-lettered jobs finished before now - older_than; return how many."""
        ...

    async def recount(self, tenant_id: str | None = None) -> dict[str, dict[JobStatus, int]]:
        """Rebuild counters from the job records; return the counts written."""
        ...

    async def ping(self) -> None:
        """Raise StoreUnavailableError unless the store answers."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
