"""Every metric the exporter serves: names, help texts, labels and buckets, in one place."""

from __future__ import annotations

from typing import Final

from jobs.telemetry import Outcome

# State metrics (read from the store by the one exporter holding the state lease; `max by` keeps
# queries right during a handover and with a forced role on several replicas).
JOBS: Final = "embedding_jobs"
JOBS_HELP: Final = "Jobs per tenant and status, from the store's per-tenant counters."
JOBS_STUCK: Final = "embedding_jobs_stuck"
JOBS_STUCK_HELP: Final = "Jobs sitting in pending or processing for longer than the stuck threshold."
JOBS_STUCK_OLDEST: Final = "embedding_jobs_stuck_oldest_age_seconds"
JOBS_STUCK_OLDEST_HELP: Final = "Age of the longest-waiting stuck job per tenant and status."
# The labels of the three families above.
JOBS_LABELS: Final = ("tenant", "status")
QUEUE_MESSAGES: Final = "embedding_queue_messages"
QUEUE_MESSAGES_HELP: Final = "Messages in the queue by state (active, scheduled, dead_letter)."
QUEUE_MESSAGES_LABELS: Final = ("queue", "state")
QUEUE_STATES: Final = ("active", "scheduled", "dead_letter")

# Event metrics (from embedding.job spans; each replica counts its own: aggregate with sum).
JOB_DURATION: Final = "embedding_job_duration_seconds"
JOB_DURATION_HELP: Final = "Duration of one attempt at a job (by outcome with metrics_detail=full)."
JOB_DURATION_LABELS: Final = ("tenant",)
JOB_DURATION_LABELS_FULL: Final = ("tenant", "outcome")
QUEUE_WAIT: Final = "embedding_job_queue_wait_seconds"
QUEUE_WAIT_HELP: Final = "Time from enqueue (or scheduled retry time) to the start of an attempt."
QUEUE_WAIT_LABELS: Final = ("tenant",)
ATTEMPTS: Final = "embedding_job_attempts"
ATTEMPTS_HELP: Final = "Attempts at jobs by outcome (completed, failed, dead_lettered)."
ATTEMPTS_LABELS: Final = ("tenant", "outcome")
VECTORS: Final = "embedding_vectors"
VECTORS_HELP: Final = "Vectors produced by completed attempts."
VECTORS_LABELS: Final = ("tenant",)

# The exporter itself.
REFRESH_DURATION: Final = "embedding_exporter_store_refresh_duration_seconds"
REFRESH_DURATION_HELP: Final = "Time taken to read state metrics from the store."
REFRESH_ERRORS: Final = "embedding_exporter_store_refresh_errors"
REFRESH_ERRORS_HELP: Final = "Failed or timed-out reads of state metrics from the store."
REFRESH_LAST_SUCCESS: Final = "embedding_exporter_store_last_success_timestamp_seconds"
REFRESH_LAST_SUCCESS_HELP: Final = "Unix time of the last successful read of state metrics."
# A store or queue-depth read takes milliseconds when healthy and is cut off by its timeout
# (10 s by default), so the buckets run from 5 ms to 10 s.
READ_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Queue depth is read apart from the store (its own timeout, errors and age), so either source
# failing leaves the other's gauges fresh and each alert names the component that fails.
QUEUE_DEPTH_DURATION: Final = "embedding_exporter_queue_depth_duration_seconds"
QUEUE_DEPTH_DURATION_HELP: Final = "Time taken to read the queue depth."
QUEUE_DEPTH_ERRORS: Final = "embedding_exporter_queue_depth_errors"
QUEUE_DEPTH_ERRORS_HELP: Final = "Failed or timed-out reads of the queue depth."
QUEUE_DEPTH_LAST_SUCCESS: Final = "embedding_exporter_queue_depth_last_success_timestamp_seconds"
QUEUE_DEPTH_LAST_SUCCESS_HELP: Final = "Unix time of the last successful read of the queue depth."
# Labelled by queue so the alerts on them can name it.
QUEUE_DEPTH_LABELS: Final = ("queue",)
STATE_LEADER: Final = "embedding_exporter_state_leader"
STATE_LEADER_HELP: Final = "1 while this exporter reads and exports the state metrics (the state leader), else 0."
SPANS_RECEIVED: Final = "embedding_exporter_spans_received"
SPANS_RECEIVED_HELP: Final = "Job spans turned into metrics, by source."
SPANS_RECEIVED_LABELS: Final = ("source",)
SPANS_DROPPED: Final = "embedding_exporter_spans_dropped"
SPANS_DROPPED_HELP: Final = "Job spans that could not be turned into metrics, by reason."
SPANS_DROPPED_LABELS: Final = ("reason",)
SPAN_SOURCES: Final = ("in_process", "otlp")
# Why a job span is not counted: its end precedes its start; a duration or queue wait that is
# not a finite number in range.
DROP_REASONS: Final = ("negative_duration", "invalid_value")
TENANTS_FOLDED: Final = "embedding_exporter_tenants_folded"
TENANTS_FOLDED_HELP: Final = (
    'Distinct tenants folded into tenant="__other__" because the tenant label limit was reached.'
)
TENANTS_EVICTED: Final = "embedding_exporter_tenants_evicted"
TENANTS_EVICTED_HELP: Final = "Tenants seen only in spans whose series were dropped to admit tenants the store knows."
FORWARD_DROPPED: Final = "embedding_exporter_forward_dropped"
FORWARD_DROPPED_HELP: Final = "Span batches not forwarded upstream, by reason."
FORWARD_DROPPED_LABELS: Final = ("reason",)
# Reasons known in advance (zero from the start); upstream refusals add http_<status>.
FORWARD_DROP_REASONS: Final = ("queue_full", "unreachable")
FORWARD_SENT: Final = "embedding_exporter_forward_sent"
FORWARD_SENT_HELP: Final = "Span batches forwarded upstream."

BUILD_INFO: Final = "embedding_jobs_build_info"
BUILD_INFO_HELP: Final = "Always 1; the version label says which release of embedding-jobs serves these metrics."
BUILD_INFO_LABELS: Final = ("version",)
# The base unit of the families measured in seconds, declared in OpenMetrics (`# UNIT`).
SECONDS: Final = "seconds"

OTHER_TENANT: Final = "__other__"
UNKNOWN_TENANT: Final = "__unknown__"
# Every attempt outcome but a skipped duplicate delivery, which is not an attempt.
ATTEMPT_OUTCOMES: Final = tuple(o.value for o in Outcome if o is not Outcome.SKIPPED)

# Series budget. The exposition must stay cheap at thousands of tenants, so by default each
# tenant costs at most 40 samples (README, "Series budget"): the duration histogram keeps the
# tenant label but not the outcome, and both per-tenant histograms have 10 buckets. The
# `metrics_detail=full` setting restores the outcome split and the finer buckets.
#
# Embedding attempts range from tens of milliseconds (a short shard on a local model) to
# minutes (a large shard behind a rate-limited API with in-call 429 waits). The compact
# buckets step by 2-5x from 100 ms to 300 s, with an edge at 120 s, the slow-job alert's
# threshold, so the p95 > 120 s comparison is exact rather than interpolated.
DURATION_BUCKETS: Final = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Queue wait: idle workers pick messages up in milliseconds; a backlog, a scheduled retry or a
# stalled worker pushes it to minutes or an hour.
QUEUE_WAIT_BUCKETS: Final = (0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
# Full detail: roughly doubling buckets keep p50/p95/p99 estimates within a factor of two.
DURATION_BUCKETS_FULL: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 180.0, 300.0)
QUEUE_WAIT_BUCKETS_FULL: Final = (*DURATION_BUCKETS_FULL, 600.0, 900.0, 1800.0, 3600.0)
DETAIL_LEVELS: Final = ("compact", "full")

# Worker tracking health (from the worker's OTLP metrics, or read in process by `up`), per worker
# process: a few series per worker, none per tenant.
WORKER_TRACKING: Final = "embedding_worker_tracking_"
WORKER_TRACKING_LABELS: Final = ("worker",)
WORKER_TRACKING_HELP: Final = {
    "store_failures": "Job-store calls by the worker's tracker that failed or timed out (probes included).",
    "dropped_writes": "Job-status writes the worker gave up: the buffer was full, or the store refuses them. "
    "Job records are wrong until `embedding-jobs recount`.",
    "replayed_writes": "Buffered job-status writes replayed once the store answered.",
    "adopted_writes": "Buffered job-status writes taken over at start from the spools of workers that died.",
    "buffered_writes": "Job-status writes waiting in the worker's buffer for the job store to answer.",
}
