"""Typed errors raised by the job model and the job stores."""

from __future__ import annotations


class JobError(Exception):
    """Base class of every error this package raises."""


class InvalidTenantError(JobError, ValueError):
    """A tenant id is empty, too long, or has characters outside the safe set."""


class InvalidJobError(JobError, ValueError):
    """A job record or one of its fields is malformed."""


class IllegalTransitionError(JobError):
    """The requested status change is not in the transition table."""

    def __init__(self, from_status: str, to_status: str) -> None:
        super().__init__(f"illegal transition {from_status} -> {to_status}")
        self.from_status = from_status
        self.to_status = to_status


class JobNotFoundError(JobError, LookupError):
    """No job with that id exists in that tenant."""

    def __init__(self, tenant_id: str, job_id: str) -> None:
        super().__init__(f"job {job_id!r} not found in tenant {tenant_id!r}")
        self.tenant_id = tenant_id
        self.job_id = job_id


class TransitionConflictError(JobError):
    """The job is not in the expected status any more: another writer got there first."""

    def __init__(self, job_id: str, expected: str, actual: str) -> None:
        super().__init__(f"job {job_id!r} is {actual}, expected {expected}")
        self.job_id = job_id
        self.expected = expected
        self.actual = actual


class InvalidContinuationError(JobError, ValueError):
    """A continuation token was not produced by this store for this query."""


class StoreUnavailableError(JobError):
    """The backing store could not be reached or answered with a transient error."""
