"""Job status writes that never block embedding.

The worker records each attempt through a JobTracker. Every store call it makes is
bounded by a timeout; a call that fails or times out means the store is unavailable,
and the write joins a bounded FIFO (worker/spool.py: on disk, so a crash loses none)
instead. While the store is known to be unavailable, new writes join the FIFO at once
rather than each waiting out a timeout, and a background task probes the store with
one buffered write at a time, backing off exponentially. Once the store answers, the
FIFO is replayed in order and new writes go direct again, except for jobs that still
have buffered writes: those queue behind them, so each job's history stays in order.

A write that timed out may still land later (a stalled request served once the network
recovers, or a SQLite call still running on its connection's thread), and a crash
mid-replay replays some writes twice. Replaying a job's writes again from any point of
its history ends in the same record: a begin moves any unfinished job to processing
(processing -> processing is legal) and skips a finished one, a finish that finds the
job finished keeps the stored record. A replayed begin cannot tell a stale attempt from
a redelivery whose begin was merely queued behind older writes, so it does what a live
begin does; the job's later writes, behind it, then settle the record.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from enum import Enum
from typing import TypeVar

from jobs.errors import (
    IllegalTransitionError,
    JobNotFoundError,
    StoreUnavailableError,
    TransitionConflictError,
)
from jobs.model import TERMINAL, Job, JobMetadata, JobStatus, truncate_error
from jobs.store import JobStore
from worker.messages import JobMessage
from worker.spool import BEGIN, Spool, TrackedWrite

log = logging.getLogger(__name__)
S = JobStatus
T = TypeVar("T")
_RESOLVE_ATTEMPTS = 5
# Buffered writes of different jobs replayed at once once the store answers: a backlog from a
# long outage drains in a fraction of the time, while each job's writes still go one by one.
_REPLAY_BATCH = 16


class Begin(Enum):
    """Whether the worker should process a delivered job."""

    PROCEED = "proceed"
    # The job already completed: a duplicate delivery.
    SKIP = "skip"
    # The job is already dead-lettered: its message belongs in the dead-letter queue, where a
    # worker killed between recording the job and dead-lettering the message never put it.
    DEAD_LETTERED = "dead_lettered"


def begin_from_status(attempt: int) -> JobStatus:
    """The status a begin expects the job in: pending on the first attempt, failed on a retry."""
    return S.PENDING if attempt == 0 else S.FAILED


def begin_settled_by(status: JobStatus) -> Begin | None:
    """What a begin that found the job in status answers; None: move it from that status to processing."""
    if status is S.DEAD_LETTERED:
        return Begin.DEAD_LETTERED
    if status in TERMINAL:
        return Begin.SKIP
    return None


class JobTracker:
    """Applies job transitions with bounded waits, buffering (and spooling) them while the store is unavailable.

    `running()` closes the spool it was given on exit; writes still buffered then stay in
    the spool file for the next worker on the same data directory.
    """

    def __init__(
        self,
        store: JobStore,
        *,
        buffer_size: int = 10_000,
        retry_initial: float = 0.2,
        # A probe is one small write; a short cap means records converge soon after an outage.
        retry_max: float = 5.0,
        timeout: float = 5.0,
        spool: Spool | None = None,
    ) -> None:
        self.store = store
        self._spool = spool if spool is not None else Spool()
        self._buffer_size = buffer_size
        self._timeout = timeout
        self._blocked: Counter[tuple[str, str]] = Counter(write.key for write in self._spool)
        # Set when a store call failed or timed out; cleared as soon as one succeeds again.
        self._down = False
        self._wakeup = asyncio.Event()
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        # Store calls that failed or timed out, probes included.
        self.store_failures = 0
        # Writes given up: the buffer was full, or a buffered write can never be applied.
        self.dropped_writes = 0
        self.replayed_writes = 0
        # Writes taken over at start from the spools of workers that died.
        self.adopted_writes = self._spool.adopted

    @property
    def buffered(self) -> int:
        """Writes waiting for the store to come back."""
        return len(self._spool)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[JobTracker]:
        """Run the replay task for the duration of the block; then try one last flush."""
        task = asyncio.create_task(self._replay_forever(), name="job-tracker-replay")
        try:
            yield self
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if self._spool:
                await self.flush_once()
            if self._spool and self._spool.path is not None:
                log.warning(
                    "%d job-store write(s) still buffered at shutdown; kept in %s for the next worker to replay",
                    len(self._spool),
                    self._spool.path,
                )
            elif self._spool:
                log.error("%d job-store writes still buffered at shutdown; they are lost", len(self._spool))
            self._spool.close()

    async def begin(self, msg: JobMessage, trace_id: str | None) -> Begin:
        """Mark the job processing (creating it if no producer did); SKIP or DEAD_LETTERED if it already finished."""
        write = TrackedWrite.begin(msg, trace_id)
        if self._down or self._blocked[write.key]:
            self._enqueue(write)
            return Begin.PROCEED
        try:
            return await self._begin(write)
        except StoreUnavailableError as exc:
            self._unavailable(write, exc)
            return Begin.PROCEED

    async def finish(
        self,
        msg: JobMessage,
        to_status: JobStatus,
        *,
        error: str | None = None,
        retry_count: int | None = None,
        metadata: JobMetadata | None = None,
    ) -> None:
        """Record how the attempt ended: processing -> completed, failed or dead_lettered."""
        bounded = truncate_error(error) if error is not None else None
        write = TrackedWrite.finish(msg, to_status, error=bounded, retry_count=retry_count, metadata=metadata)
        if self._down or self._blocked[write.key]:
            self._enqueue(write)
            return
        try:
            await self._finish(write, replay=False)
        except StoreUnavailableError as exc:
            self._unavailable(write, exc)

    async def _call(self, call: Awaitable[T]) -> T:
        """One store call, bounded by the timeout; a timeout is the store being unavailable."""
        try:
            return await asyncio.wait_for(call, self._timeout)
        except TimeoutError:
            # The call may still land (see the module docstring); replays are idempotent for that.
            raise StoreUnavailableError(f"job store did not answer within {self._timeout:g}s") from None

    @property
    def timeout(self) -> float:
        """Seconds a store call may take before the store counts as unavailable."""
        return self._timeout

    @property
    def writes_directly(self) -> bool:
        """True while the store answers and nothing is buffered: a write now goes straight to the store.

        Only then may a caller apply a job's writes itself, merged with others in one unit of
        work (worker/local_path.py); otherwise they must go through begin() and finish() so
        they queue behind the buffered ones.
        """
        return not self._down and not self._spool

    def kept_stored(self, write: TrackedWrite, actual: str) -> None:
        """Log that a finish found the job no longer processing, so the stored record stands."""
        assert write.status is not None
        # A duplicate delivery raced us, or the job was finished by another worker: the first
        # writer's record stands.
        log.warning(
            "job %s was %s when recording %s; keeping the stored record",
            write.job_id,
            actual,
            write.status.value,
            extra={"tenant_id": write.tenant_id, "job_id": write.job_id},
        )

    async def _begin(self, write: TrackedWrite) -> Begin:
        expected = begin_from_status(write.attempt)
        for _ in range(_RESOLVE_ATTEMPTS):
            try:
                begun = self.store.transition(
                    write.tenant_id, write.job_id, expected, S.PROCESSING, trace_id=write.trace_id
                )
                await self._call(begun)
                return Begin.PROCEED
            except JobNotFoundError:
                job = Job.new(
                    job_id=write.job_id,
                    tenant_id=write.tenant_id,
                    shard_id=write.shard_id,
                    shard_type_id=write.shard_type_id,
                    status=S.PROCESSING,
                    trace_id=write.trace_id,
                )
                stored = await self._call(self.store.create(job))
                if stored.status is S.PROCESSING:
                    return Begin.PROCEED
                expected = stored.status
            except TransitionConflictError as exc:
                expected = S(exc.actual)
            if (settled := begin_settled_by(expected)) is not None:
                return settled
        raise StoreUnavailableError(f"job {write.job_id} kept changing status under us")

    async def _finish(self, write: TrackedWrite, *, replay: bool) -> None:
        assert write.status is not None
        extra = {"tenant_id": write.tenant_id, "job_id": write.job_id}
        try:
            await self._call(
                self.store.transition(
                    write.tenant_id,
                    write.job_id,
                    S.PROCESSING,
                    write.status,
                    error=write.error,
                    retry_count=write.retry_count,
                    metadata=write.metadata,
                )
            )
        except TransitionConflictError as exc:
            if replay and exc.actual == write.status.value:
                # This very write timed out but landed, or was replayed before a crash.
                log.debug("job %s already %s; nothing to replay", write.job_id, exc.actual, extra=extra)
                return
            self.kept_stored(write, exc.actual)
        except (JobNotFoundError, IllegalTransitionError) as exc:
            log.error("cannot record %s for job %s: %s", write.status.value, write.job_id, exc, extra=extra)

    async def _replay(self, write: TrackedWrite) -> None:
        if write.kind == BEGIN:
            await self._begin(write)
        else:
            await self._finish(write, replay=True)

    def _unavailable(self, write: TrackedWrite, exc: Exception) -> None:
        self.store_failures += 1
        if not self._down:
            log.warning(
                "job store unavailable during %s; buffering job-store writes until it answers: %s",
                write.describe,
                exc,
                extra={"tenant_id": write.tenant_id, "job_id": write.job_id},
            )
        self._down = True
        self._enqueue(write)

    def _enqueue(self, write: TrackedWrite) -> None:
        if len(self._spool) >= self._buffer_size:
            self.dropped_writes += 1
            log.error(
                "tracking buffer full (%d); dropping %s; run `embedding-jobs recount` after recovery",
                self._buffer_size,
                write.describe,
                extra={"tenant_id": write.tenant_id, "job_id": write.job_id},
            )
            return
        # In the spool file before it counts as buffered: a crash from here on loses nothing.
        self._spool.append(write)
        self._blocked[write.key] += 1
        self._wakeup.set()

    def _release(self) -> None:
        write = self._spool.pop()
        self._blocked[write.key] -= 1
        if not self._blocked[write.key]:
            del self._blocked[write.key]

    async def flush_once(self) -> bool:
        """Replay buffered writes in order until the store fails; True when the buffer is empty.

        While the store is known to be down, one write probes it; once it answers, writes of
        different jobs are replayed a batch at a time.
        """
        while self._spool:
            batch = self._spool.head(1 if self._down else _REPLAY_BATCH)
            keys = [write.key for write in batch]
            # Writes of one job are never in flight together: the batch ends before a repeated job.
            batch = next((batch[:n] for n in range(1, len(batch)) if keys[n] in keys[:n]), batch)
            results = await asyncio.gather(*(self._replay(write) for write in batch), return_exceptions=True)
            for write, result in zip(batch, results, strict=True):
                if isinstance(result, StoreUnavailableError):
                    # Writes after this one in the batch may have landed; they are replayed again.
                    self.store_failures += 1
                    self._down = True
                    return False
                if isinstance(result, asyncio.CancelledError):
                    raise result
                if isinstance(result, Exception):
                    self.dropped_writes += 1
                    log.error(
                        "dropping buffered %s that the store refuses: %r",
                        write.describe,
                        result,
                        extra={"tenant_id": write.tenant_id, "job_id": write.job_id},
                    )
                else:
                    self.replayed_writes += 1
                if self._down:
                    log.info("job store answering again; replaying %d buffered write(s)", len(self._spool))
                    self._down = False
                self._release()
        return True

    async def _replay_forever(self) -> None:
        delay = self._retry_initial
        while True:
            if not self._spool:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self._down:
                # The write that just failed gives the store a moment before the probe.
                await asyncio.sleep(delay)
            if await self.flush_once():
                log.info("buffered job-store writes replayed (%d in total)", self.replayed_writes)
                delay = self._retry_initial
            else:
                delay = min(delay * 2, self._retry_max)
