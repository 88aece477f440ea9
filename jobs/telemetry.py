"""Span names and attribute keys: the worker writes them, the exporter reads them."""

from __future__ import annotations

from enum import StrEnum
from typing import Final

JOB_SPAN: Final = "embedding.job"
ENQUEUE_SPAN: Final = "embedding.enqueue"
INSTRUMENTATION_NAME: Final = "embedding_jobs"

# OpenTelemetry messaging and gen_ai semantic conventions.
MESSAGING_SYSTEM: Final = "messaging.system"
MESSAGING_DESTINATION: Final = "messaging.destination.name"
MESSAGING_OPERATION_TYPE: Final = "messaging.operation.type"
MESSAGING_OPERATION_NAME: Final = "messaging.operation.name"
MESSAGING_MESSAGE_ID: Final = "messaging.message.id"
MESSAGING_DELIVERY_COUNT: Final = "messaging.servicebus.message.delivery_count"
GEN_AI_OPERATION: Final = "gen_ai.operation.name"
GEN_AI_MODEL: Final = "gen_ai.request.model"
ERROR_TYPE: Final = "error.type"

# This project's own attributes.
TENANT: Final = "embedding.tenant_id"
JOB_ID: Final = "embedding.job_id"
SHARD_ID: Final = "embedding.shard_id"
SHARD_TYPE_ID: Final = "embedding.shard_type_id"
RETRY_COUNT: Final = "embedding.retry_count"
OUTCOME: Final = "embedding.outcome"
VECTOR_COUNT: Final = "embedding.vector_count"
CHUNK_COUNT: Final = "embedding.chunk_count"
QUEUE_WAIT: Final = "embedding.queue_wait_seconds"
DEAD_LETTER_REASON: Final = "embedding.dead_letter_reason"


class Outcome(StrEnum):
    """How one attempt ended; `skipped` marks a duplicate delivery of a finished job."""

    COMPLETED = "completed"
    FAILED = "failed"
    DEAD_LETTERED = "dead_lettered"
    SKIPPED = "skipped"


# Worker tracking health (worker/tracker.py), reported as OTLP metrics by the worker and served by
# the exporter as embedding_worker_tracking_* series. Keys of a tracking snapshot; instrument names
# are TRACKING_METRIC_PREFIX + key.
TRACKING_METRIC_PREFIX: Final = "embedding.worker.tracking."
# Counters: store calls that failed or timed out; writes given up; writes replayed from the buffer;
# writes taken over at start from the spools of workers that died.
TRACKING_COUNTERS: Final = ("store_failures", "dropped_writes", "replayed_writes", "adopted_writes")
# Gauge: writes waiting in the buffer for the store to answer.
TRACKING_GAUGES: Final = ("buffered_writes",)
# The resource attribute naming the reporting worker process.
SERVICE_INSTANCE_ID: Final = "service.instance.id"
