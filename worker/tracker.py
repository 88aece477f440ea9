"""Job status writes that never block embedding.

The worker records each attempt through a JobTracker. When the store answers,
writes go straight through. When it does not, the write joins a bounded FIFO
buffer that a background task replays with exponential backoff, so records
converge once the store is back; writes for a job with buffered writes queue
behind them to keep each job's history in order. Every failure is counted and
logged; a write dropped because the buffer is full is logged as an error.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import Enum

from jobs.errors import (
    IllegalTransitionError,
    JobNotFoundError,
    StoreUnavailableError,
    TransitionConflictError,
)
from jobs.model import TERMINAL, Job, JobMetadata, JobStatus, truncate_error
from jobs.store import JobStore
from worker.messages import JobMessage

log = logging.getLogger(__name__)
S = JobStatus
_RESOLVE_ATTEMPTS = 5


class Begin(Enum):
    """Whether the worker should process a delivered job."""

    PROCEED = "proceed"
    # The job already finished (completed or dead-lettered): a duplicate delivery.
    SKIP = "skip"


@dataclass(frozen=True, slots=True)
class _Write:
    key: tuple[str, str]
    describe: str
    apply: Callable[[], Awaitable[object]]


class JobTracker:
    """Applies job transitions, buffering them while the store is unavailable."""

    def __init__(
        self,
        store: JobStore,
        *,
        buffer_size: int = 10_000,
        retry_initial: float = 0.2,
        retry_max: float = 30.0,
    ) -> None:
        self.store = store
        self._buffer: deque[_Write] = deque()
        self._buffer_size = buffer_size
        self._blocked: Counter[tuple[str, str]] = Counter()
        self._wakeup = asyncio.Event()
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self.store_failures = 0
        self.dropped_writes = 0
        self.replayed_writes = 0

    @property
    def buffered(self) -> int:
        """Writes waiting for the store to come back."""
        return len(self._buffer)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[JobTracker]:
        """Run the replay task for the duration of the block; then try one last flush."""
        task = asyncio.create_task(self._replay_forever(), name="job-tracker-replay")
        try:
            yield self
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if self._buffer:
                await self.flush_once()
            if self._buffer:
                log.error("%d job-store writes still buffered at shutdown; they are lost", len(self._buffer))

    async def begin(self, msg: JobMessage, trace_id: str | None) -> Begin:
        """Mark the job processing (creating it if no producer did); SKIP if it already finished."""
        key = (msg.tenant_id, msg.job_id)

        async def apply() -> Begin:
            return await self._begin(msg, trace_id)

        if self._blocked[key]:
            self._enqueue(_Write(key, "begin", apply))
            return Begin.PROCEED
        try:
            return await apply()
        except StoreUnavailableError as exc:
            self._note_failure(key, "begin", exc)
            self._enqueue(_Write(key, "begin", apply))
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
        key = (msg.tenant_id, msg.job_id)
        bounded = truncate_error(error) if error is not None else None

        async def apply() -> None:
            await self._finish(msg, to_status, bounded, retry_count, metadata)

        write = _Write(key, f"finish:{to_status.value}", apply)
        if self._blocked[key]:
            self._enqueue(write)
            return
        try:
            await apply()
        except StoreUnavailableError as exc:
            self._note_failure(key, write.describe, exc)
            self._enqueue(write)

    async def _begin(self, msg: JobMessage, trace_id: str | None) -> Begin:
        expected = S.PENDING if msg.attempt == 0 else S.FAILED
        for _ in range(_RESOLVE_ATTEMPTS):
            try:
                await self.store.transition(msg.tenant_id, msg.job_id, expected, S.PROCESSING, trace_id=trace_id)
                return Begin.PROCEED
            except JobNotFoundError:
                job = Job.new(
                    job_id=msg.job_id,
                    tenant_id=msg.tenant_id,
                    shard_id=msg.shard_id,
                    shard_type_id=msg.shard_type_id,
                    status=S.PROCESSING,
                    trace_id=trace_id,
                )
                stored = await self.store.create(job)
                if stored.status is S.PROCESSING:
                    return Begin.PROCEED
                expected = stored.status
            except TransitionConflictError as exc:
                expected = S(exc.actual)
            if expected in TERMINAL:
                return Begin.SKIP
        raise StoreUnavailableError(f"job {msg.job_id} kept changing status under us")

    async def _finish(
        self,
        msg: JobMessage,
        to_status: JobStatus,
        error: str | None,
        retry_count: int | None,
        metadata: JobMetadata | None,
    ) -> None:
        try:
            await self.store.transition(
                msg.tenant_id,
                msg.job_id,
                S.PROCESSING,
                to_status,
                error=error,
                retry_count=retry_count,
                metadata=metadata,
            )
        except TransitionConflictError as exc:
            # A duplicate delivery raced us, or the job was finished by another worker:
            # the first writer's record stands.
            log.warning(
                "job %s was %s when recording %s; keeping the stored record",
                msg.job_id,
                exc.actual,
                to_status.value,
                extra={"tenant_id": msg.tenant_id, "job_id": msg.job_id},
            )
        except (JobNotFoundError, IllegalTransitionError) as exc:
            log.error(
                "cannot record %s for job %s: %s",
                to_status.value,
                msg.job_id,
                exc,
                extra={"tenant_id": msg.tenant_id, "job_id": msg.job_id},
            )

    def _note_failure(self, key: tuple[str, str], what: str, exc: Exception) -> None:
        self.store_failures += 1
        log.warning(
            "job store unavailable during %s; buffering the write (%d buffered): %s",
            what,
            len(self._buffer) + 1,
            exc,
            extra={"tenant_id": key[0], "job_id": key[1]},
        )

    def _enqueue(self, write: _Write) -> None:
        if len(self._buffer) >= self._buffer_size:
            self.dropped_writes += 1
            log.error(
                "tracking buffer full (%d); dropping %s; run `embedding-jobs recount` after recovery",
                self._buffer_size,
                write.describe,
                extra={"tenant_id": write.key[0], "job_id": write.key[1]},
            )
            return
        self._buffer.append(write)
        self._blocked[write.key] += 1
        self._wakeup.set()

    async def flush_once(self) -> bool:
        """Replay buffered writes in order until one fails; True when the buffer is empty."""
        while self._buffer:
            write = self._buffer[0]
            try:
                await write.apply()
            except StoreUnavailableError:
                self.store_failures += 1
                return False
            self._buffer.popleft()
            self._blocked[write.key] -= 1
            if not self._blocked[write.key]:
                del self._blocked[write.key]
            self.replayed_writes += 1
        return True

    async def _replay_forever(self) -> None:
        delay = self._retry_initial
        while True:
            if not self._buffer:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # The write that just failed gives the store a moment before the replay.
            await asyncio.sleep(delay)
            if await self.flush_once():
                log.info("job store back: buffered writes replayed (%d in total)", self.replayed_writes)
                delay = self._retry_initial
            else:
                delay = min(delay * 2, self._retry_max)
