"""The JobStore protocol every backend implements, and the values it returns."""

from __future__ import annotations

import base64
import builtins
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, Protocol

from jobs.errors import InvalidContinuationError
from jobs.model import Job, JobMetadata, JobStatus


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


def encode_continuation(query: Mapping[str, Any], position: Mapping[str, Any]) -> str:
    """An opaque token binding a resume position to the query it came from."""
    raw = json.dumps({"q": query, "p": position}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_continuation(token: str, query: Mapping[str, Any]) -> dict[str, Any]:
    """The resume position in token; InvalidContinuationError if malformed or from another query."""
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        position = data["p"]
        if not isinstance(position, dict):
            raise TypeError("position is not an object")
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidContinuationError("malformed continuation token") from exc
    if data.get("q") != dict(query):
        raise InvalidContinuationError("continuation token belongs to a different query")
    return position


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
    ) -> Job:
        """Move a job from from_status to to_status and update its tenant's counters atomically.

        IllegalTransitionError if the table forbids it, JobNotFoundError if there is no such
        job, TransitionConflictError if the job is no longer in from_status.
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
