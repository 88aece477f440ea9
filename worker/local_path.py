"""The local worker's writes on one SQLite file, merged per job.

On the embedded defaults the queue, the job records and the shards are tables of one
file on one connection (jobs/sqlite_db.py). A job's writes there can share transactions
that each component alone would make separately:

- receive: the messages' locks and their jobs' begins (pending or failed -> processing,
  or the job created if no producer recorded it) commit together, and the shards of the
  jobs to work on are read in the same call;
- complete: the vectors, the completed record and the message's removal commit together.

Merging changes what a crash can leave behind only for the better: a kill between the
writes of one of these transactions now leaves none of them, where it used to leave a
prefix (vectors without a record, a record with its message still queued), which the
redelivery then had to reconcile. What each write does is unchanged, so a redelivery,
a duplicate or a replay meets the same records as before.

Both merges apply only while the tracker writes straight to the store (nothing buffered,
store answering). Otherwise a job's writes must queue behind the buffered ones, so the
consumer makes the separate calls, which the tracker buffers as usual.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from jobs.errors import (
    IllegalTransitionError,
    JobError,
    JobNotFoundError,
    StoreUnavailableError,
    TransitionConflictError,
)
from jobs.model import Job, JobMetadata, JobStatus
from jobs.sqlite_db import transaction
from jobs.sqlite_store import SQLiteJobStore
from worker.local_queue import LocalQueue
from worker.messages import JobMessage, MalformedMessageError, parse_message
from worker.queue import MessageLockLostError, Queue, QueueUnavailableError, ReceivedMessage
from worker.shards import Shard, ShardStore, ShardVectors, SQLiteShardStore
from worker.spool import TrackedWrite
from worker.tracing import carrier_trace_id
from worker.tracker import Begin, JobTracker, begin_from_status, begin_settled_by

log = logging.getLogger(__name__)
S = JobStatus
# A begin inside one transaction sees no concurrent writer: two steps always settle it
# (a conflict names the status the second step starts from).
_BEGIN_STEPS = 3


@dataclass(frozen=True, slots=True)
class Begun:
    """What receiving did for one message: its job's begin, and the shard to embed if the job proceeds."""

    begin: Begin
    # None when the job does not proceed, or its shard is missing (the consumer's own read reports that).
    shard: Shard | None


@dataclass(frozen=True, slots=True)
class Completion:
    """How a merged completion went: the job's record, and whether the message was still ours to remove."""

    # The job's status when the completed record was refused (another delivery finished it first).
    kept: str | None
    # Why the record could not be written at all (the job is gone, or its status forbids it).
    refused: str | None
    lock_lost: bool


class LocalPath:
    """Merged writes for a worker whose queue, job store and shard store are one SQLite file."""

    def __init__(self, queue: LocalQueue, store: SQLiteJobStore, shards: SQLiteShardStore, tracker: JobTracker) -> None:
        self.queue = queue
        self.store = store
        self.shards = shards
        self.tracker = tracker
        self._timeout = tracker.timeout
        self._begun: dict[str, Begun] = {}

    @classmethod
    def of(cls, queue: Queue, shards: ShardStore, tracker: JobTracker) -> LocalPath | None:
        """A LocalPath when the queue, the tracker's store and shards share one connection; None otherwise."""
        store = tracker.store
        if not (
            isinstance(queue, LocalQueue) and isinstance(store, SQLiteJobStore) and isinstance(shards, SQLiteShardStore)
        ):
            return None
        db = queue.database
        if db is None or not (db.shares_connection_with(store.database) and db.shares_connection_with(shards.database)):
            return None
        return cls(queue, store, shards, tracker)

    async def receive(self, max_messages: int = 1, max_wait: float = 1.0) -> Sequence[ReceivedMessage]:
        """Receive, beginning each message's job in the same transaction while the tracker writes directly.

        take() then hands the consumer each message's begin.
        """
        if not self.tracker.writes_directly:
            return await self.queue.receive(max_messages, max_wait)
        try:
            received = await self.queue.receive_with(self._begin_all, max_messages, max_wait)
        except JobError as exc:  # a begin that cannot run: the whole receipt is rolled back
            raise QueueUnavailableError(f"local queue {self.queue.name!r}: {exc}") from exc
        for message, begin in received:
            if begin is not None:
                self._begun[message.lock_token] = begin
        return [message for message, _ in received]

    def take(self, received: ReceivedMessage) -> Begun | None:
        """What receiving did for this message, once; None if it began nothing."""
        return self._begun.pop(received.lock_token, None)

    def _begin_all(self, conn: sqlite3.Connection, messages: list[ReceivedMessage]) -> list[Begun | None]:
        results: list[Begun | None] = []
        for received in messages:
            try:
                msg = parse_message(received.body) if received.body_error is None else None
            except MalformedMessageError:
                msg = None  # the consumer dead-letters it
            begin = None if msg is None else self._begin(conn, msg, received)
            if msg is None or begin is None:
                results.append(None)
                continue
            shard = self.shards.find_in(conn, msg.tenant_id, msg.shard_id) if begin is Begin.PROCEED else None
            results.append(Begun(begin, shard))
        return results

    def _begin(self, conn: sqlite3.Connection, msg: JobMessage, received: ReceivedMessage) -> Begin | None:
        trace_id = carrier_trace_id(received.application_properties)
        expected = begin_from_status(msg.attempt)
        try:
            for _ in range(_BEGIN_STEPS):
                try:
                    self.store.transition_in(
                        conn, msg.tenant_id, msg.job_id, expected, S.PROCESSING, trace_id=trace_id
                    )
                    return Begin.PROCEED
                except JobNotFoundError:
                    stored = self.store.create_in(
                        conn,
                        Job.new(
                            job_id=msg.job_id,
                            tenant_id=msg.tenant_id,
                            shard_id=msg.shard_id,
                            shard_type_id=msg.shard_type_id,
                            status=S.PROCESSING,
                            trace_id=trace_id,
                        ),
                    )
                    if stored.status is S.PROCESSING:
                        return Begin.PROCEED
                    expected = stored.status
                except TransitionConflictError as exc:
                    expected = S(exc.actual)
                if (settled := begin_settled_by(expected)) is not None:
                    return settled
        except (sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.ProgrammingError, sqlite3.DataError) as exc:
            # A value this job's record cannot hold: the consumer's own begin meets it and handles it.
            log.debug("begin of job %s left to the consumer: %r", msg.job_id, exc)
        except (OverflowError, UnicodeEncodeError, JobError):
            # A value this job's record cannot hold: the consumer's own begin meets it and handles it.
            pass
        return None

    async def complete(
        self, received: ReceivedMessage, msg: JobMessage, vectors: ShardVectors, metadata: JobMetadata, trace_id: str
    ) -> bool:
        """Save the vectors, record the job completed and remove its message in one transaction.

        False, having written nothing that matters, when the tracker is buffering or the file
        does not answer in time: the consumer then makes the separate calls (each of which is
        idempotent, should this transaction land late).
        """
        if not self.tracker.writes_directly:
            return False
        write = TrackedWrite.finish(msg, S.COMPLETED, error=None, retry_count=None, metadata=metadata)
        try:
            async with asyncio.timeout(self._timeout):
                done = await self.store.database.run(self._complete, received, msg, vectors, metadata, trace_id)
        except (StoreUnavailableError, TimeoutError) as exc:
            log.warning(
                "merged completion of job %s did not commit (%s); writing it step by step",
                msg.job_id,
                exc or f"no answer within {self._timeout:g}s",
                extra={"tenant_id": msg.tenant_id, "job_id": msg.job_id},
            )
            return False
        if done.kept is not None:
            self.tracker.kept_stored(write, done.kept)
        if done.refused is not None:
            log.error(
                "cannot record completed for job %s: %s",
                msg.job_id,
                done.refused,
                extra={"tenant_id": msg.tenant_id, "job_id": msg.job_id},
            )
        if done.lock_lost:
            # The message comes back to some receiver; the job record dedupes the redelivery.
            log.warning("lock lost before settling message %s; it will be redelivered", received.message_id)
        return True

    def _complete(
        self,
        conn: sqlite3.Connection,
        received: ReceivedMessage,
        msg: JobMessage,
        vectors: ShardVectors,
        metadata: JobMetadata,
        trace_id: str,
    ) -> Completion:
        kept = refused = None
        lock_lost = False
        with transaction(conn):
            self.shards.save_vectors_in(conn, msg.tenant_id, msg.shard_id, vectors)
            try:
                self.store.transition_in(
                    conn,
                    msg.tenant_id,
                    msg.job_id,
                    S.PROCESSING,
                    S.COMPLETED,
                    error=None,
                    metadata=metadata,
                    trace_id=trace_id,
                )
            except TransitionConflictError as exc:
                kept = exc.actual
            except (JobNotFoundError, IllegalTransitionError) as exc:
                refused = str(exc)
            try:
                self.queue.complete_in(conn, received)
            except MessageLockLostError:
                lock_lost = True
        return Completion(kept=kept, refused=refused, lock_lost=lock_lost)
