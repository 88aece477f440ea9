"""Every metric the exporter serves: names, help texts, labels and buckets, in one place."""

from __future__ import annotations

from typing import Final

PREFIX: Final = "embedding"

# State metrics (read from the store by the one exporter holding the state lease; `max by` keeps
# queries right during a handover and with a forced role on several replicas).
JOBS: Final = "embedding_jobs"
JOBS_HELP: Final = "Jobs per tenant and status, from the store's per-tenant counters."
JOBS_STUCK: Final = "embedding_jobs_stuck"
JOBS_STUCK_HELP: Final = "Jobs sitting in pending or processing for longer than the stuck threshold."
JOBS_STUCK_OLDEST: Final = "embedding_jobs_stuck_oldest_age_seconds"
JOBS_STUCK_OLDEST_HELP: Final = "Age of the longest-waiting stuck job per tenant and status."
QUEUE_MESSAGES: Final = "embedding_queue_messages"
QUEUE_MESSAGES_HELP: Final = "Messages in the queue by state (active, scheduled, dead_letter)."

# Event metrics (from embedding.job spans; each replica counts its own: aggregate with sum).
JOB_DURATION: Final = "embedding_job_duration_seconds"
JOB_DURATION_HELP: Final = "Duration of one attempt at a job, by outcome."
QUEUE_WAIT: Final = "embedding_job_queue_wait_seconds"
QUEUE_WAIT_HELP: Final = "Time from enqueue (or scheduled retry time) to the start of an attempt."
ATTEMPTS: Final = "embedding_job_attempts"
ATTEMPTS_HELP: Final = "Attempts at jobs by outcome (completed, failed, dead_lettered)."
VECTORS: Final = "embedding_vectors"
VECTORS_HELP: Final = "Vectors produced by completed attempts."

# The exporter itself.
REFRESH_DURATION: Final = "embedding_exporter_store_refresh_duration_seconds"
REFRESH_ERRORS: Final = "embedding_exporter_store_refresh_errors"
REFRESH_LAST_SUCCESS: Final = "embedding_exporter_store_last_success_timestamp_seconds"
STATE_LEADER: Final = "embedding_exporter_state_leader"
STATE_LEADER_HELP: Final = "1 while this exporter reads and exports the state metrics (the state leader), else 0."
SPANS_RECEIVED: Final = "embedding_exporter_spans_received"
SPANS_DROPPED: Final = "embedding_exporter_spans_dropped"
TENANTS_FOLDED: Final = "embedding_exporter_tenants_folded"
FORWARD_DROPPED: Final = "embedding_exporter_forward_dropped"
FORWARD_SENT: Final = "embedding_exporter_forward_sent"

OTHER_TENANT: Final = "__other__"
UNKNOWN_TENANT: Final = "__unknown__"
ATTEMPT_OUTCOMES: Final = ("completed", "failed", "dead_lettered")

# Embedding attempts range from tens of milliseconds (a short shard on a local model) to
# minutes (a large shard behind a rate-limited API with in-call 429 waits). Roughly
# doubling buckets from 50 ms to 300 s keep the p50/p95/p99 estimates within a factor of
# two everywhere, with 16 series per tenant and outcome.
DURATION_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 180.0, 300.0)
# Queue wait spans the same range: idle workers pick messages up in milliseconds, a backlog
# or a stalled worker pushes it to minutes.
QUEUE_WAIT_BUCKETS: Final = DURATION_BUCKETS
