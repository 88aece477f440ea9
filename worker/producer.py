"""Enqueueing jobs: a pending record plus a message that carries the trace context."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from jobs import telemetry as attr
from jobs.errors import JobError
from jobs.model import Job
from jobs.store import JobStore
from worker.messages import JobMessage
from worker.queue import Queue
from worker.shards import Shard, ShardStore
from worker.tracing import inject_context

log = logging.getLogger(__name__)


def job_id_for(shard: Shard) -> str:
    """A job id derived from the shard and its content, so re-sending unchanged content dedupes."""
    digest = hashlib.sha256(f"{shard.tenant_id}\x00{shard.id}\x00{shard.content_hash}".encode())
    return digest.hexdigest()[:32]


class Producer:
    """Creates pending job records and sends their messages."""

    def __init__(self, store: JobStore, queue: Queue, tracer: trace.Tracer) -> None:
        self.store = store
        self.queue = queue
        self.tracer = tracer

    async def enqueue(self, msg: JobMessage, *, message_id: str | None = None) -> None:
        """Record the job as pending and send its message; a store failure never stops the send.

        message_id overrides the default (the job id) where a queue's duplicate detection must
        not swallow a deliberate resend, such as a manual retry.
        """
        with self.tracer.start_as_current_span(
            attr.ENQUEUE_SPAN,
            kind=SpanKind.PRODUCER,
            attributes={
                attr.MESSAGING_DESTINATION: self.queue.name,
                attr.MESSAGING_OPERATION_TYPE: "send",
                attr.MESSAGING_MESSAGE_ID: message_id or msg.message_id,
                attr.TENANT: msg.tenant_id,
                attr.JOB_ID: msg.job_id,
                attr.SHARD_ID: msg.shard_id,
            },
        ) as span:
            carrier: dict[str, str] = {}
            inject_context(carrier)
            job = Job.new(
                job_id=msg.job_id,
                tenant_id=msg.tenant_id,
                shard_id=msg.shard_id,
                shard_type_id=msg.shard_type_id,
                trace_id=format(span.get_span_context().trace_id, "032x"),
            )
            try:
                await self.store.create(job)
            except JobError as exc:
                # The worker creates the record itself when none exists.
                log.warning("could not record pending job %s: %s", msg.job_id, exc)
            await self.queue.send(
                msg.to_body(), message_id=message_id or msg.message_id, application_properties=carrier
            )


async def ingest_shard(shards: ShardStore, producer: Producer, shard: Shard) -> bool:
    """Save a shard and enqueue its job when its content is new or changed; True if enqueued."""
    if not await shards.put(shard):
        return False
    await producer.enqueue(
        JobMessage(
            job_id=job_id_for(shard), tenant_id=shard.tenant_id, shard_id=shard.id, shard_type_id=shard.shard_type_id
        )
    )
    return True


def shard_id_from_path(path: Path) -> str:
    """A safe shard id from a file name."""
    cleaned = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in path.stem).strip("-._")
    return cleaned[:128] or hashlib.sha256(path.name.encode()).hexdigest()[:16]
