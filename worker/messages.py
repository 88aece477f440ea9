"""The job message on the queue: its JSON body, validation, and trace context carriage."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jobs import strict_json
from jobs.errors import JobError
from jobs.model import validate_id, validate_tenant_id
from worker.tracing import PROPERTIES_GETTER, propagation_fields

MAX_BODY_BYTES = 64 * 1024
# A job message is one flat object; a little room is left for nested fields added later.
MAX_DEPTH = 8
# Far above any sane max_attempts, far below what a store's integer can hold: a larger attempt
# number is a forged or corrupted message, not a job to retry.
MAX_ATTEMPT = 10_000
_FIELDS = ("jobId", "tenantId", "shardId", "shardTypeId")


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
    """Validate a message body; MalformedMessageError says precisely what is wrong.

    Total: any body at all either parses or raises MalformedMessageError, never anything else.
    """
    if not isinstance(body, bytes | bytearray | memoryview):
        raise MalformedMessageError(f"body must be bytes, not {type(body).__name__}")
    if len(body) > MAX_BODY_BYTES:
        raise MalformedMessageError(f"body is {len(body)} bytes; at most {MAX_BODY_BYTES} allowed")
    try:
        data = strict_json.loads(body, max_depth=MAX_DEPTH)
    except strict_json.JSONInputError as exc:
        raise MalformedMessageError(f"body is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise MalformedMessageError(f"body must be a JSON object, not {strict_json.type_name(data)}")
    missing = [key for key in _FIELDS if key not in data]
    if missing:
        raise MalformedMessageError(f"missing field(s): {', '.join(missing)}")
    wrong = [f"{key} is {strict_json.type_name(data[key])}" for key in _FIELDS if not isinstance(data[key], str)]
    if wrong:
        raise MalformedMessageError(f"ids must be strings: {', '.join(wrong)}")
    attempt = data.get("attempt", 0)
    if not isinstance(attempt, int) or isinstance(attempt, bool) or not 0 <= attempt <= MAX_ATTEMPT:
        shown = (
            attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else strict_json.type_name(attempt)
        )
        raise MalformedMessageError(f"attempt must be an integer from 0 to {MAX_ATTEMPT}; got {shown}")
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


def trace_carrier(properties: Mapping[Any, Any]) -> dict[str, str]:
    """The entries of a message's application properties that the global propagator reads.

    traceparent, tracestate and baggage by default; OTEL_PROPAGATORS may name others.
    """
    carrier: dict[str, str] = {}
    for key in propagation_fields():
        values = PROPERTIES_GETTER.get(properties, key)
        if values:
            carrier[key] = values[0]
    return carrier
