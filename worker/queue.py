"""The queue protocol the worker consumes: peek-lock semantics shared by every adapter."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol


class QueueError(Exception):
    """Base class of queue adapter errors."""


class MessageLockLostError(QueueError):
    """The message's lock expired or it was settled already; another receiver may own it."""


class QueueUnavailableError(QueueError):
    """The queue could not be reached."""


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """A message received under a lock. Settle it through the queue that returned it."""

    message_id: str
    body: bytes
    lock_token: str
    locked_until: datetime
    # 1 on the first delivery (this one included).
    delivery_count: int
    enqueued_time: datetime
    sequence_number: int
    application_properties: Mapping[str, str] = field(default_factory=dict)
    # Set, with body empty, when the adapter could not read the body as bytes (an AMQP value
    # or sequence section that is not text): the consumer dead-letters the message as malformed.
    body_error: str | None = None


@dataclass(frozen=True, slots=True)
class DeadLetteredMessage:
    """A message in the dead-letter sub-queue, with the reason it was put there."""

    message_id: str
    body: bytes
    reason: str
    description: str
    delivery_count: int
    enqueued_time: datetime
    sequence_number: int
    application_properties: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class QueueDepth:
    """How many messages are waiting, scheduled for later, and dead-lettered."""

    active: int
    scheduled: int
    dead_letter: int


class Queue(Protocol):
    """Peek-lock queue: receive under a lock, then complete, abandon or dead-letter."""

    name: str

    async def send(
        self,
        body: bytes,
        *,
        message_id: str,
        application_properties: Mapping[str, str] | None = None,
        scheduled_enqueue_time: datetime | None = None,
    ) -> int:
        """Enqueue a message, visible at once or at scheduled_enqueue_time; return its sequence number."""
        ...

    async def receive(self, max_messages: int = 1, max_wait: float = 1.0) -> Sequence[ReceivedMessage]:
        """Lock and return up to max_messages, waiting at most max_wait seconds for the first."""
        ...

    async def complete(self, message: ReceivedMessage) -> None:
        """Remove the message for good. MessageLockLostError if its lock is gone."""
        ...

    async def abandon(self, message: ReceivedMessage) -> None:
        """Release the lock so the message is delivered again (its delivery count grows)."""
        ...

    async def dead_letter(self, message: ReceivedMessage, reason: str, description: str) -> None:
        """Move the message to the dead-letter sub-queue with a reason."""
        ...

    async def renew_lock(self, message: ReceivedMessage) -> datetime:
        """Extend the message's lock; return the new locked-until time."""
        ...

    async def peek_dead_letters(
        self, max_messages: int = 100, from_sequence_number: int = 0
    ) -> Sequence[DeadLetteredMessage]:
        """Read dead-lettered messages without removing them, in sequence order."""
        ...

    async def depth(self) -> QueueDepth:
        """Current counts of active, scheduled and dead-lettered messages."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
