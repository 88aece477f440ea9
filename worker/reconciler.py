"""The dead-letter reconciler: jobs whose message the queue dead-lettered are marked so.

Service Bus dead-letters a message by itself after its max delivery count, for example
when workers kept crashing mid-job; the job record then still says pending, processing or
failed. The reconciler peeks the dead-letter sub-queue (never removing anything, so it is
safe to run repeatedly and from several workers) and moves such jobs to dead_lettered with
the queue's reason.

A message the worker dead-lettered itself (its reasons are WORKER_REASONS) is left alone:
the worker recorded its job before dead-lettering it, and the job may have been retried
and be running again since, which marking it would undo.

A dead-lettered message sent before its job last became pending is not the job's current
message: a manual retry or a new ingest sent another since. Passes start again from the
beginning of the sub-queue whenever a worker starts, so such a message would otherwise
dead-letter the retried job again; it is counted as superseded and left alone.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from jobs.errors import JobNotFoundError, TransitionConflictError
from jobs.model import TERMINAL, JobStatus
from jobs.store import JobStore
from worker.consumer import WORKER_REASONS
from worker.messages import MalformedMessageError, parse_message
from worker.queue import Queue

log = logging.getLogger(__name__)
PAGE = 100


@dataclass
class ReconcileResult:
    """What one pass found: messages read, jobs marked, and messages that name no job."""

    scanned: int = 0
    marked: int = 0
    already_final: int = 0
    superseded: int = 0
    # Dead-lettered by the worker itself, which recorded the job first.
    recorded: int = 0
    unknown: int = 0
    next_sequence_number: int = 0


async def reconcile_dead_letters(queue: Queue, store: JobStore, *, from_sequence_number: int = 0) -> ReconcileResult:
    """Mark the jobs of dead-lettered messages dead_lettered; resume later from next_sequence_number."""
    result = ReconcileResult(next_sequence_number=from_sequence_number)
    while True:
        page = await queue.peek_dead_letters(PAGE, result.next_sequence_number)
        if not page:
            return result
        for message in page:
            result.scanned += 1
            result.next_sequence_number = max(result.next_sequence_number, message.sequence_number + 1)
            if message.reason in WORKER_REASONS:
                result.recorded += 1
                continue
            try:
                msg = parse_message(message.body)
            except MalformedMessageError:
                result.unknown += 1
                continue
            try:
                job = await store.get(msg.tenant_id, msg.job_id)
            except JobNotFoundError:
                result.unknown += 1
                continue
            if job.status in TERMINAL:
                result.already_final += 1
                continue
            if job.status is JobStatus.PENDING and message.enqueued_time < job.updated_at:
                result.superseded += 1
                continue
            error = f"dead-lettered by the queue: {message.reason}: {message.description}".rstrip(": ")
            try:
                await store.transition(
                    msg.tenant_id, msg.job_id, job.status, JobStatus.DEAD_LETTERED, error=error[:2000]
                )
            except TransitionConflictError:
                # It moved meanwhile (a worker finished it): the newer record stands.
                result.already_final += 1
                continue
            result.marked += 1
            log.warning(
                "job marked dead_lettered from the dead-letter queue (%s)",
                message.reason,
                extra={"tenant_id": msg.tenant_id, "job_id": msg.job_id},
            )
        if len(page) < PAGE:
            return result


async def reconcile_forever(queue: Queue, store: JobStore, interval: float) -> None:
    """Run a reconcile pass every interval seconds, resuming where the last pass stopped."""
    position = 0
    while True:
        try:
            result = await reconcile_dead_letters(queue, store, from_sequence_number=position)
            position = result.next_sequence_number
        except Exception as exc:  # a failed pass must never stop the worker
            log.warning("dead-letter reconcile pass failed: %s", exc)
        await asyncio.sleep(interval)
