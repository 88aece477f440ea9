"""Sending to a local queue the way the producer does."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from jobs.model import Job
from worker.local_queue import LocalQueue
from worker.messages import JobMessage

Enqueue = Callable[[Job], Awaitable[None]]


def queue_sender(queue: LocalQueue) -> Enqueue:
    """Sends a retried job's message the way the producer does: attempt 0, the job's ids."""

    async def send(job: Job) -> None:
        message = JobMessage(job.id, job.tenant_id, job.shard_id, job.shard_type_id)
        await queue.send(message.to_body(), message_id=message.message_id)

    return send
