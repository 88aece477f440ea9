"""The job message on the queue: its JSON body, validation, and trace context carriage."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jobs.errors import JobError
from jobs.model import validate_id, validate_tenant_id

MAX_BODY_BYTES = 64 * 1024
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"


class MalformedMessageError(ValueError):
    """The message cannot be a job: it is dead-lettered at once with this reason."""


@dataclass(frozen=True, slots=True)
class JobMessage:
    """What a producer asks the worker to do: embed one shard of one tenant."""

    job_id: str
    tenant_id: str
    shard_id: str
    shard_type_id: str
    # 0 for the first attempt; the worker's scheduled retries carry 1, 2, ...
    attempt: int = 0

    def to_body(self) -> bytes:
        """The camelCase JSON body."""
        data: dict[str, Any] = {
            "jobId": self.job_id,
            "tenantId": self.tenant_id,
            "shardId": self.shard_id,
            "shardTypeId": self.shard_type_id,
        }
        if self.attempt:
            data["attempt"] = self.attempt
        return json.dumps(data, separators=(",", ":")).encode()

    @property
    def message_id(self) -> str:
        """Queue message id: the job id, suffixed per retry so duplicate detection keeps retries."""
        return self.job_id if self.attempt == 0 else f"{self.job_id}.retry-{self.attempt}"

    def retry(self) -> JobMessage:
        """The message for the next attempt."""
        return JobMessage(self.job_id, self.tenant_id, self.shard_id, self.shard_type_id, self.attempt + 1)


def parse_message(body: bytes) -> JobMessage:
    """Validate a message body; MalformedMessageError says precisely what is wrong."""
    if len(body) > MAX_BODY_BYTES:
        raise MalformedMessageError(f"body is {len(body)} bytes; at most {MAX_BODY_BYTES} allowed")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedMessageError(f"body is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise MalformedMessageError(f"body must be a JSON object, not {type(data).__name__}")
    missing = [key for key in ("jobId", "tenantId", "shardId", "shardTypeId") if key not in data]
    if missing:
        raise MalformedMessageError(f"missing field(s): {', '.join(missing)}")
    attempt = data.get("attempt", 0)
    if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 0:
        raise MalformedMessageError("attempt must be a non-negative integer")
    try:
        return JobMessage(
            job_id=validate_id(data["jobId"], "jobId"),
            tenant_id=validate_tenant_id(data["tenantId"]),
            shard_id=validate_id(data["shardId"], "shardId"),
            shard_type_id=validate_id(data["shardTypeId"], "shardTypeId"),
            attempt=attempt,
        )
    except JobError as exc:
        raise MalformedMessageError(str(exc)) from exc


def trace_carrier(properties: Mapping[str, Any]) -> dict[str, str]:
    """The W3C trace context entries of a message's application properties."""
    carrier: dict[str, str] = {}
    for key in (TRACEPARENT, TRACESTATE):
        value = properties.get(key)
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        if isinstance(value, str):
            carrier[key] = value
    return carrier
