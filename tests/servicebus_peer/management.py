"""Service Bus management operations (`<entity>/$management`) against the peer's store.

Requests carry the operation in the ``operation`` application property and an AMQP map
body; replies carry ``statusCode``/``statusDescription`` (camelCase, unlike CBS) and a
map body. Only the operations a queue client uses are served; others get 501.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proton import Array, Data, symbol

from tests.servicebus_peer import codec
from tests.servicebus_peer.store import Entity

VENDOR = "com.microsoft:"
MESSAGE_NOT_FOUND = VENDOR + "message-not-found"
MESSAGE_LOCK_LOST = VENDOR + "message-lock-lost"
RENEW_LOCK = VENDOR + "renew-lock"
UPDATE_DISPOSITION = VENDOR + "update-disposition"

# update-disposition statuses (the management-link fallback for settlement).
COMPLETED = "completed"
ABANDONED = "abandoned"
SUSPENDED = "suspended"


@dataclass
class Reply:
    """A management response: status, description, optional error condition and map body."""

    status: int
    description: str
    body: dict[str, Any] | None = None
    condition: str | None = None

    def properties(self) -> dict[str, Any]:
        """Application properties of the response message."""
        props: dict[str, Any] = {"statusCode": self.status, "statusDescription": self.description}
        if self.condition is not None:
            props["errorCondition"] = symbol(self.condition)
        return props


@dataclass
class Request:
    """A decoded management request for one entity."""

    entity: Entity
    operation: str
    body: dict[str, Any]
    now: float


Operation = Callable[[Request], Reply]


def handle(request: Request) -> Reply:
    """Run one management request."""
    operation = _OPERATIONS.get(request.operation)
    if operation is None:
        return Reply(501, f"operation {request.operation!r} is not supported by the test peer")
    try:
        return operation(request)
    except (KeyError, TypeError, ValueError) as exc:
        return Reply(400, f"malformed {request.operation} request: {exc!r}", condition="amqp:decode-error")


def renew_lock(request: Request) -> Reply:
    """Extend message locks; one expiry per token, or 410 lock-lost for the first lost one."""
    expirations = []
    for token in _tokens(request.body["lock-tokens"]):
        until = request.entity.renew(token, request.now)
        if until is None:
            return Reply(410, f"The lock on message {token} was lost.", condition=MESSAGE_LOCK_LOST)
        expirations.append(codec.millis(until))
    return Reply(200, "OK", {"expirations": Array(Data.NULL, Data.TIMESTAMP, *expirations)})


def schedule_message(request: Request) -> Reply:
    """Store messages to become visible at their scheduled-enqueue-time."""
    numbers = []
    for item in request.body["messages"]:
        sections = codec.split_sections(bytes(item["message"]))
        annotations = codec.map_of(sections, codec.MESSAGE_ANNOTATIONS)
        due = int(annotations[codec.SCHEDULED_ENQUEUE_TIME]) / 1000
        numbers.append(request.entity.schedule(sections, due, request.now).sequence_number)
    return Reply(200, "OK", {"sequence-numbers": Array(Data.NULL, Data.LONG, *numbers)})


def cancel_scheduled_message(request: Request) -> Reply:
    """Drop scheduled messages; 404 if one is not (or no longer) scheduled."""
    for number in _elements(request.body["sequence-numbers"]):
        if not request.entity.cancel_scheduled(int(number)):
            return Reply(404, f"No scheduled message with sequence number {number}.", condition=MESSAGE_NOT_FOUND)
    return Reply(200, "OK", {})


def peek_message(request: Request) -> Reply:
    """Browse messages from a sequence number without locking; 204 when there are none."""
    start = int(request.body["from-sequence-number"])
    count = int(request.body["message-count"])
    envelopes = request.entity.peek(start, count)
    if not envelopes:
        return Reply(204, "No messages to peek.")
    # Peeked messages carry no lock: browsing does not take one.
    messages = [{"message": envelope.encode(with_lock=False)} for envelope in envelopes]
    return Reply(200, "OK", {"messages": messages})


def update_disposition(request: Request) -> Reply:
    """Settle locked messages by lock token (the SDK's fallback when a receive link is gone)."""
    status = str(request.body["disposition-status"])
    entity = request.entity
    for token in _tokens(request.body["lock-tokens"]):
        if not entity.holds(token, request.now):
            return Reply(410, f"The lock on message {token} was lost.", condition=MESSAGE_LOCK_LOST)
        if status == COMPLETED:
            entity.complete(token)
        elif status == ABANDONED:
            entity.abandon(token)
        elif status == SUSPENDED:
            reason = request.body.get("deadletter-reason")
            description = request.body.get("deadletter-description")
            entity.dead_letter_locked(token, reason, description)
        else:
            return Reply(501, f"disposition-status {status!r} is not supported by the test peer")
    return Reply(200, "OK", {})


def _elements(value: Any) -> list[Any]:
    """Elements of an AMQP array or list."""
    if isinstance(value, Array):
        return list(value.elements)
    return list(value)


def _tokens(value: Any) -> list[uuid.UUID]:
    return [token if isinstance(token, uuid.UUID) else uuid.UUID(str(token)) for token in _elements(value)]


_OPERATIONS: dict[str, Operation] = {
    RENEW_LOCK: renew_lock,
    VENDOR + "schedule-message": schedule_message,
    VENDOR + "cancel-scheduled-message": cancel_scheduled_message,
    VENDOR + "peek-message": peek_message,
    UPDATE_DISPOSITION: update_disposition,
}
