"""The embedded queue: a SQLite table with Service Bus peek-lock semantics."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

from jobs.errors import StoreUnavailableError
from jobs.sqlite_db import SQLiteDatabase, transaction
from worker.queue import (
    DeadLetteredMessage,
    MessageLockLostError,
    QueueDepth,
    QueueUnavailableError,
    ReceivedMessage,
)

T = TypeVar("T")

MAX_DELIVERY_COUNT_EXCEEDED = "MaxDeliveryCountExceeded"
_MAX_SEQUENCE_NUMBER = 2**63 - 1

# One row per message. A locked message keeps its token with visible_at = locked_until, so an
# expired lock needs no sweeper: the row simply becomes visible again and the stale token fails.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS queue_messages (
    sequence_number INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    message_id TEXT NOT NULL,
    body BLOB NOT NULL,
    application_properties TEXT NOT NULL,
    enqueued_time REAL NOT NULL,
    visible_at REAL NOT NULL,
    lock_token TEXT,
    delivery_count INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'dead_letter')),
    dead_letter_reason TEXT,
    dead_letter_description TEXT
);
CREATE INDEX IF NOT EXISTS queue_messages_by_state
    ON queue_messages (queue, state, sequence_number);
"""

# Settlement applies only while the caller's lock is current and unexpired; otherwise it is lost.
_HELD = (
    "SELECT 1 FROM queue_messages WHERE queue = ? AND sequence_number = ? AND state = 'active'"
    " AND lock_token = ? AND visible_at > ?"
)


def _timestamp(moment: datetime) -> float:
    if moment.tzinfo is None:
        raise ValueError("scheduled_enqueue_time must be timezone-aware (use datetime.now(UTC))")
    return moment.timestamp()


def _nothing(conn: sqlite3.Connection, messages: list[ReceivedMessage]) -> list[None]:
    return [None] * len(messages)


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


class LocalQueue:
    """A peek-lock queue in a SQLite file, shareable by queues, processes and the job store.

    Open with `await queue.open()` (or `async with`), and `await queue.close()` when done.
    """

    def __init__(
        self,
        path: str | Path,
        name: str = "embedding-jobs",
        *,
        lock_duration: float = 30.0,
        max_delivery_count: int = 10,
    ) -> None:
        if not name:
            raise ValueError("queue name must be a non-empty string")
        if lock_duration <= 0:
            raise ValueError(f"lock_duration must be positive, got {lock_duration}")
        if max_delivery_count < 1:
            raise ValueError(f"max_delivery_count must be at least 1, got {max_delivery_count}")
        self.path = Path(path)
        self.name = name
        self.lock_duration = lock_duration
        self.max_delivery_count = max_delivery_count
        self._db: SQLiteDatabase | None = None

    async def open(self) -> Self:
        """Open (creating if needed) the file and the queue's table; the file may hold other tables."""
        if self._db is None:
            try:
                self._db = await SQLiteDatabase.open(self.path, _SCHEMA)
            except StoreUnavailableError as exc:
                raise QueueUnavailableError(f"cannot open local queue {self.name!r}: {exc}") from exc
        return self

    @property
    def database(self) -> SQLiteDatabase | None:
        """The connection the queue runs on once open (shared by everything that opened the same file)."""
        return self._db

    async def close(self) -> None:
        """Close the connection; calls already under way finish first."""
        db, self._db = self._db, None
        if db is not None:
            await db.close()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self._db is None:
            raise QueueUnavailableError(f"local queue {self.name!r} is not open; call open() or use async with")
        try:
            return await self._db.run(work)
        except StoreUnavailableError as exc:
            raise QueueUnavailableError(f"local queue {self.name!r}: {exc}") from exc

    async def send(
        self,
        body: bytes,
        *,
        message_id: str,
        application_properties: Mapping[str, str] | None = None,
        scheduled_enqueue_time: datetime | None = None,
    ) -> int:
        """Enqueue a message, visible at once or at scheduled_enqueue_time; return its sequence number."""
        if not message_id:
            raise ValueError("message_id must be a non-empty string")
        scheduled = None if scheduled_enqueue_time is None else _timestamp(scheduled_enqueue_time)
        properties = json.dumps(dict(application_properties or {}))

        def insert(conn: sqlite3.Connection) -> int:
            now = time.time()
            # As in Service Bus, a scheduled message counts as enqueued when it becomes active,
            # so queue-wait measured from enqueued_time excludes the backoff it was scheduled for.
            visible_at = now if scheduled is None else max(now, scheduled)
            with transaction(conn):
                cursor = conn.execute(
                    "INSERT INTO queue_messages (queue, message_id, body, application_properties,"
                    " enqueued_time, visible_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (self.name, message_id, bytes(body), properties, visible_at, visible_at),
                )
            assert cursor.lastrowid is not None
            return cursor.lastrowid

        return await self._run(insert)

    async def receive(self, max_messages: int = 1, max_wait: float = 1.0) -> Sequence[ReceivedMessage]:
        """Lock and return up to max_messages, waiting at most max_wait seconds for the first."""
        return [message for message, _ in await self.receive_with(_nothing, max_messages, max_wait)]

    async def receive_with(
        self,
        also: Callable[[sqlite3.Connection, list[ReceivedMessage]], Sequence[T]],
        max_messages: int = 1,
        max_wait: float = 1.0,
    ) -> list[tuple[ReceivedMessage, T]]:
        """receive(), running also(connection, messages) in the transaction that locks them.

        For writes that belong with the receipt in the same file (a job's begin): they commit
        with the locks or not at all. also returns one result per message, paired with it.
        """
        if max_messages < 1:
            raise ValueError(f"max_messages must be at least 1, got {max_messages}")
        deadline = time.monotonic() + max(max_wait, 0.0)
        backoff = 0.01

        def lock(conn: sqlite3.Connection) -> list[tuple[ReceivedMessage, T]]:
            with transaction(conn):
                received = self._lock_visible(conn, max_messages)
                return list(zip(received, also(conn, received), strict=True)) if received else []

        while True:
            # Cancelled mid-call, the locks taken still stand and lapse after lock_duration,
            # the same outcome as a Service Bus receiver that dies holding messages.
            received = await self._run(lock)
            remaining = deadline - time.monotonic()
            if received or remaining <= 0:
                return received
            await asyncio.sleep(min(backoff, remaining))
            backoff = min(backoff * 2, 0.2)

    def _lock_visible(self, conn: sqlite3.Connection, max_messages: int) -> list[ReceivedMessage]:
        received: list[ReceivedMessage] = []
        with transaction(conn):
            now = time.time()
            locked_until = now + self.lock_duration
            while len(received) < max_messages:
                rows = conn.execute(
                    "SELECT * FROM queue_messages WHERE queue = ? AND state = 'active' AND visible_at <= ?"
                    " ORDER BY sequence_number LIMIT ?",
                    (self.name, now, max_messages - len(received)),
                ).fetchall()
                if not rows:
                    break
                for row in rows:
                    if row["delivery_count"] >= self.max_delivery_count:
                        self._move_to_dead_letter(
                            conn,
                            row["sequence_number"],
                            MAX_DELIVERY_COUNT_EXCEEDED,
                            f"Message could not be consumed after {row['delivery_count']} delivery attempts.",
                        )
                        continue
                    token = str(uuid.uuid4())
                    conn.execute(
                        "UPDATE queue_messages SET lock_token = ?, visible_at = ?,"
                        " delivery_count = delivery_count + 1 WHERE sequence_number = ?",
                        (token, locked_until, row["sequence_number"]),
                    )
                    received.append(
                        ReceivedMessage(
                            message_id=row["message_id"],
                            body=bytes(row["body"]),
                            lock_token=token,
                            locked_until=_utc(locked_until),
                            delivery_count=row["delivery_count"] + 1,
                            enqueued_time=_utc(row["enqueued_time"]),
                            sequence_number=row["sequence_number"],
                            application_properties=json.loads(row["application_properties"]),
                        )
                    )
        return received

    def _move_to_dead_letter(
        self, conn: sqlite3.Connection, sequence_number: int, reason: str, description: str
    ) -> None:
        conn.execute(
            "UPDATE queue_messages SET state = 'dead_letter', lock_token = NULL,"
            " dead_letter_reason = ?, dead_letter_description = ? WHERE sequence_number = ?",
            (reason, description, sequence_number),
        )

    async def _settle(self, message: ReceivedMessage, action: Callable[[sqlite3.Connection], T]) -> T:
        return await self._run(lambda conn: self._settle_in(conn, message, action))

    def _settle_in(
        self, conn: sqlite3.Connection, message: ReceivedMessage, action: Callable[[sqlite3.Connection], T]
    ) -> T:
        with transaction(conn):
            held = conn.execute(_HELD, (self.name, message.sequence_number, message.lock_token, time.time())).fetchone()
            if held is None:
                raise MessageLockLostError(
                    f"lock on message {message.message_id!r} (sequence {message.sequence_number})"
                    f" in queue {self.name!r} expired or the message was settled already"
                )
            return action(conn)

    async def complete(self, message: ReceivedMessage) -> None:
        """Remove the message for good. MessageLockLostError if its lock is gone."""
        await self._run(lambda conn: self.complete_in(conn, message))

    def complete_in(self, conn: sqlite3.Connection, message: ReceivedMessage) -> None:
        """complete() on the caller's connection thread, joining the caller's transaction if one is open."""
        self._settle_in(
            conn,
            message,
            lambda c: c.execute("DELETE FROM queue_messages WHERE sequence_number = ?", (message.sequence_number,)),
        )

    async def abandon(self, message: ReceivedMessage) -> None:
        """Release the lock at once so the message is delivered again (its delivery count grows)."""
        await self._settle(
            message,
            lambda conn: conn.execute(
                "UPDATE queue_messages SET lock_token = NULL, visible_at = ? WHERE sequence_number = ?",
                (time.time(), message.sequence_number),
            ),
        )

    async def dead_letter(self, message: ReceivedMessage, reason: str, description: str) -> None:
        """Move the message to the dead-letter sub-queue with a reason."""
        await self._settle(
            message,
            lambda conn: self._move_to_dead_letter(conn, message.sequence_number, reason, description),
        )

    async def renew_lock(self, message: ReceivedMessage) -> datetime:
        """Extend the message's lock by lock_duration from now; return the new locked-until time."""

        def extend(conn: sqlite3.Connection) -> float:
            locked_until = time.time() + self.lock_duration
            conn.execute(
                "UPDATE queue_messages SET visible_at = ? WHERE sequence_number = ?",
                (locked_until, message.sequence_number),
            )
            return locked_until

        return _utc(await self._settle(message, extend))

    async def peek_dead_letters(
        self, max_messages: int = 100, from_sequence_number: int = 0
    ) -> Sequence[DeadLetteredMessage]:
        """Read dead-lettered messages without removing them, in sequence order."""

        def peek(conn: sqlite3.Connection) -> list[DeadLetteredMessage]:
            rows = conn.execute(
                "SELECT * FROM queue_messages WHERE queue = ? AND state = 'dead_letter'"
                " AND sequence_number >= ? ORDER BY sequence_number LIMIT ?",
                (self.name, from_sequence_number, max_messages),
            ).fetchall()
            return [
                DeadLetteredMessage(
                    message_id=row["message_id"],
                    body=bytes(row["body"]),
                    reason=row["dead_letter_reason"],
                    description=row["dead_letter_description"],
                    delivery_count=row["delivery_count"],
                    enqueued_time=_utc(row["enqueued_time"]),
                    sequence_number=row["sequence_number"],
                    application_properties=json.loads(row["application_properties"]),
                )
                for row in rows
            ]

        return await self._run(peek)

    async def purge_dead_letters(self, up_to_sequence_number: int | None = None) -> int:
        """Delete dead-lettered messages (all, or those up to a sequence number); return how many."""

        def purge(conn: sqlite3.Connection) -> int:
            up_to = _MAX_SEQUENCE_NUMBER if up_to_sequence_number is None else up_to_sequence_number
            with transaction(conn):
                cursor = conn.execute(
                    "DELETE FROM queue_messages WHERE queue = ? AND state = 'dead_letter' AND sequence_number <= ?",
                    (self.name, up_to),
                )
            return cursor.rowcount

        return await self._run(purge)

    async def depth(self) -> QueueDepth:
        """Current counts of active (visible or locked), scheduled and dead-lettered messages."""

        def count(conn: sqlite3.Connection) -> QueueDepth:
            # One statement, so the three counts come from one consistent snapshot.
            row = conn.execute(
                "SELECT"
                " COUNT(*) FILTER (WHERE state = 'active' AND (visible_at <= ?1 OR lock_token IS NOT NULL)),"
                " COUNT(*) FILTER (WHERE state = 'active' AND visible_at > ?1 AND lock_token IS NULL),"
                " COUNT(*) FILTER (WHERE state = 'dead_letter')"
                " FROM queue_messages WHERE queue = ?2",
                (time.time(), self.name),
            ).fetchone()
            return QueueDepth(active=row[0], scheduled=row[1], dead_letter=row[2])

        return await self._run(count)
