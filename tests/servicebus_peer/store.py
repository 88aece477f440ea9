"""Queue state of the test peer: sequence numbers, peek-locks, scheduling, dead-lettering.

Bookkeeping with explicit clocks; it knows nothing of links or threads (the reactor
thread is its only caller) and touches AMQP only to stamp what it hands out.
"""

from __future__ import annotations

import bisect
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from tests.servicebus_peer import codec
from tests.servicebus_peer.codec import Section

DEAD_LETTER_SUFFIX = "/$deadletterqueue"
MAX_DELIVERY_COUNT_EXCEEDED = "MaxDeliveryCountExceeded"


@dataclass
class Envelope:
    """A stored message and what the broker knows about it."""

    sequence_number: int
    sections: list[Section]
    enqueued_at: float
    # Prior delivery attempts, as the AMQP header counts them: 0 on the first delivery.
    delivery_count: int = 0
    lock_token: uuid.UUID | None = None
    locked_until: float = 0.0
    dead_letter_reason: str | None = None
    dead_letter_description: str | None = None

    def encode(self, *, with_lock: bool) -> bytes:
        """The message as the broker hands it out: its annotations, and the dead-letter reason."""
        annotations: dict[Any, Any] = {
            codec.SEQUENCE_NUMBER: self.sequence_number,
            codec.ENQUEUED_TIME: codec.millis(self.enqueued_at),
        }
        if with_lock and self.lock_token is not None:
            annotations[codec.LOCK_TOKEN] = self.lock_token
            annotations[codec.LOCKED_UNTIL] = codec.millis(self.locked_until)
        properties = None
        if self.dead_letter_reason is not None or self.dead_letter_description is not None:
            # Service Bus exposes these as application properties on the dead-letter sub-queue.
            properties = {
                "DeadLetterReason": self.dead_letter_reason or "",
                "DeadLetterErrorDescription": self.dead_letter_description or "",
            }
        return codec.render(
            self.sections,
            delivery_count=self.delivery_count,
            annotations=annotations,
            application_properties=properties,
        )


@dataclass(frozen=True)
class DeadLettered:
    """A dead-lettered message as tests see it."""

    sequence_number: int
    message_id: Any
    reason: str | None
    description: str | None
    delivery_count: int


@dataclass(frozen=True)
class QueueRuntime:
    """A queue's runtime properties at one moment, as the management API reports them."""

    name: str
    lock_duration: float
    max_delivery_count: int
    active: int
    scheduled: int
    dead_letter: int
    size_in_bytes: int
    created_at: float
    # Epoch seconds of the last send or receive; 0.0 if there has been none.
    accessed_at: float


@dataclass
class Entity:
    """A queue, or the dead-letter sub-queue of one (which has no sub-queue of its own)."""

    name: str
    lock_duration: float
    max_delivery_count: int
    dead_letter: Entity | None = None
    available: list[Envelope] = field(default_factory=list)
    locked: dict[uuid.UUID, Envelope] = field(default_factory=dict)
    scheduled: dict[int, tuple[float, Envelope]] = field(default_factory=dict)
    last_sequence_number: int = 0
    # Queues come into being by name on first use, where no caller has a clock to pass.
    created_at: float = field(default_factory=time.time)
    accessed_at: float = 0.0

    # -- arrival -------------------------------------------------------------------------

    def enqueue(self, sections: list[Section], now: float) -> Envelope:
        """Store a sent message; one carrying a future scheduled-enqueue-time waits for it."""
        due = codec.map_of(sections, codec.MESSAGE_ANNOTATIONS).get(codec.SCHEDULED_ENQUEUE_TIME)
        if due is not None and int(due) / 1000 > now:
            return self.schedule(sections, int(due) / 1000, now)
        self.accessed_at = now
        envelope = Envelope(self._next_sequence_number(), sections, now)
        self._make_available(envelope)
        return envelope

    def schedule(self, sections: list[Section], due: float, now: float) -> Envelope:
        """Hold a message invisible until ``due`` (epoch seconds); it has its sequence number now."""
        self.accessed_at = now
        envelope = Envelope(self._next_sequence_number(), sections, now)
        self.scheduled[envelope.sequence_number] = (due, envelope)
        return envelope

    def cancel_scheduled(self, sequence_number: int) -> bool:
        """Drop a scheduled message that has not become visible yet."""
        return self.scheduled.pop(sequence_number, None) is not None

    def receive_dead_letter(self, envelope: Envelope, reason: str | None, description: str | None) -> None:
        """Take a message dead-lettered from the parent queue."""
        envelope.sequence_number = self._next_sequence_number()
        envelope.lock_token = None
        envelope.dead_letter_reason = reason
        envelope.dead_letter_description = description
        self._make_available(envelope)

    # -- delivery and settlement -----------------------------------------------------------

    def next_available(self) -> Envelope | None:
        """The lowest sequence number not locked nor scheduled, taken off the available list."""
        return self.available.pop(0) if self.available else None

    def lock(self, envelope: Envelope, now: float) -> uuid.UUID:
        """Peek-lock a message taken by ``next_available``."""
        self.accessed_at = now
        token = uuid.uuid4()
        envelope.lock_token = token
        envelope.locked_until = now + self.lock_duration
        self.locked[token] = envelope
        return token

    def holds(self, token: uuid.UUID, now: float) -> bool:
        """Whether the token still locks a message."""
        envelope = self.locked.get(token)
        return envelope is not None and envelope.locked_until > now

    def complete(self, token: uuid.UUID) -> Envelope | None:
        """Remove a locked message for good."""
        return self._unlock(token)

    def abandon(self, token: uuid.UUID) -> Envelope | None:
        """Give a locked message back, counting the failed attempt."""
        envelope = self._unlock(token)
        if envelope is not None:
            self._count_failed_attempt(envelope)
        return envelope

    def release(self, token: uuid.UUID) -> Envelope | None:
        """Give a locked message back without counting an attempt (the client never handled it)."""
        envelope = self._unlock(token)
        if envelope is not None:
            self._make_available(envelope)
        return envelope

    def dead_letter_locked(self, token: uuid.UUID, reason: str | None, description: str | None) -> bool:
        """Move a locked message to the dead-letter sub-queue."""
        envelope = self._unlock(token)
        if envelope is None:
            return False
        self._dead_letter(envelope, reason, description)
        return True

    def renew(self, token: uuid.UUID, now: float) -> float | None:
        """Extend a held lock by the lock duration; the new expiry, or None if the lock is lost."""
        if not self.holds(token, now):
            return None
        envelope = self.locked[token]
        envelope.locked_until = now + self.lock_duration
        return envelope.locked_until

    # -- time ------------------------------------------------------------------------------

    def tick(self, now: float) -> bool:
        """Expire overdue locks and reveal due scheduled messages; True if anything became available."""
        changed = False
        for token, envelope in list(self.locked.items()):
            if envelope.locked_until <= now:
                del self.locked[token]
                envelope.lock_token = None
                self._count_failed_attempt(envelope)
                changed = True
        for sequence_number, (due, envelope) in list(self.scheduled.items()):
            if due <= now:
                del self.scheduled[sequence_number]
                envelope.enqueued_at = now
                self._make_available(envelope)
                changed = True
        return changed

    def expire_all_locks(self) -> list[uuid.UUID]:
        """Make every held lock overdue, as if the lock duration had passed; the tokens affected."""
        for envelope in self.locked.values():
            envelope.locked_until = 0.0
        return list(self.locked)

    # -- inspection ------------------------------------------------------------------------

    def peek(self, from_sequence_number: int, count: int) -> list[Envelope]:
        """Active (locked or not) and scheduled messages from a sequence number, in order."""
        everything = [*self.available, *self.locked.values(), *(e for _, e in self.scheduled.values())]
        chosen = sorted(
            (e for e in everything if e.sequence_number >= from_sequence_number),
            key=lambda e: e.sequence_number,
        )
        return chosen[:count]

    @property
    def active_count(self) -> int:
        """Messages visible to receivers, locked or not."""
        return len(self.available) + len(self.locked)

    def runtime(self) -> QueueRuntime:
        """Counts and sizes for the management API; locked messages count as active, as on Service Bus."""
        dead_letter = self.dead_letter.active_count if self.dead_letter is not None else 0
        stored = [*self.available, *self.locked.values(), *(e for _, e in self.scheduled.values())]
        if self.dead_letter is not None:
            stored += [*self.dead_letter.available, *self.dead_letter.locked.values()]
        return QueueRuntime(
            name=self.name,
            lock_duration=self.lock_duration,
            max_delivery_count=self.max_delivery_count,
            active=self.active_count,
            scheduled=len(self.scheduled),
            dead_letter=dead_letter,
            size_in_bytes=sum(len(section.raw) for envelope in stored for section in envelope.sections),
            created_at=self.created_at,
            accessed_at=self.accessed_at,
        )

    def dead_lettered(self) -> list[DeadLettered]:
        """Snapshot of the dead-letter sub-queue's messages."""
        if self.dead_letter is None:
            return []
        envelopes = sorted(
            [*self.dead_letter.available, *self.dead_letter.locked.values()], key=lambda e: e.sequence_number
        )
        return [
            DeadLettered(
                e.sequence_number,
                codec.message_id(e.sections),
                e.dead_letter_reason,
                e.dead_letter_description,
                e.delivery_count,
            )
            for e in envelopes
        ]

    # -- internals -------------------------------------------------------------------------

    def _next_sequence_number(self) -> int:
        self.last_sequence_number += 1
        return self.last_sequence_number

    def _make_available(self, envelope: Envelope) -> None:
        envelope.lock_token = None
        bisect.insort(self.available, envelope, key=lambda e: e.sequence_number)

    def _unlock(self, token: uuid.UUID) -> Envelope | None:
        envelope = self.locked.pop(token, None)
        if envelope is not None:
            envelope.lock_token = None
        return envelope

    def _count_failed_attempt(self, envelope: Envelope) -> None:
        envelope.delivery_count += 1
        if self.dead_letter is not None and envelope.delivery_count >= self.max_delivery_count:
            self._dead_letter(
                envelope,
                MAX_DELIVERY_COUNT_EXCEEDED,
                f"Message could not be consumed after {self.max_delivery_count} delivery attempts.",
            )
        else:
            self._make_available(envelope)

    def _dead_letter(self, envelope: Envelope, reason: str | None, description: str | None) -> None:
        if self.dead_letter is None:
            # A dead-letter sub-queue has nowhere further to send a message; keep it visible.
            self._make_available(envelope)
            return
        self.dead_letter.receive_dead_letter(envelope, reason, description)


@dataclass
class Namespace:
    """All queues of the peer, created on first use."""

    lock_duration: float
    max_delivery_count: int
    queues: dict[str, Entity] = field(default_factory=dict)

    def create_queue(
        self, name: str, *, lock_duration: float | None = None, max_delivery_count: int | None = None
    ) -> Entity:
        """Create a queue (with its dead-letter sub-queue) or return the existing one."""
        # Entity names are case-insensitive on Service Bus (the SDK writes `$DeadLetterQueue`).
        key = name.lower()
        if key in self.queues:
            return self.queues[key]
        lock = self.lock_duration if lock_duration is None else lock_duration
        count = self.max_delivery_count if max_delivery_count is None else max_delivery_count
        dead_letter = Entity(name + DEAD_LETTER_SUFFIX, lock, count)
        queue = Entity(name, lock, count, dead_letter=dead_letter)
        self.queues[key] = queue
        return queue

    def exists(self, name: str) -> bool:
        """Whether a queue of that name has been created (explicitly or by use)."""
        return name.lower() in self.queues

    def runtime(self, name: str) -> QueueRuntime | None:
        """A queue's runtime properties, or None if no queue of that name exists (nothing is created)."""
        queue = self.queues.get(name.lower())
        return queue.runtime() if queue is not None else None

    def resolve(self, path: str) -> Entity:
        """The entity a path names: ``<queue>`` or ``<queue>/$deadletterqueue``."""
        if path.lower().endswith(DEAD_LETTER_SUFFIX):
            dead_letter = self.create_queue(path[: -len(DEAD_LETTER_SUFFIX)]).dead_letter
            assert dead_letter is not None
            return dead_letter
        return self.create_queue(path)

    def entities(self) -> list[Entity]:
        """Every queue and dead-letter sub-queue."""
        result: list[Entity] = []
        for queue in self.queues.values():
            result.append(queue)
            if queue.dead_letter is not None:
                result.append(queue.dead_letter)
        return result
