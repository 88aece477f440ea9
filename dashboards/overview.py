"""The overview dashboard: throughput, success, per-tenant status, backlog, latency, queue, exporter health.

State gauges come from the one exporter holding the state lease and are read with `max by`,
which stays right across a handover; event counters and histograms are per replica and are
summed. Per-tenant, per-queue and per-exporter series keep the deployment labels (cluster,
namespace, job), so the same tenant in staging and prod stays two lines. Per-tenant time series
are limited to the ten worst so a large tenant count stays readable.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard, prometheus, table
from grafana_foundation_sdk.models import common as common_models
from grafana_foundation_sdk.models import dashboard as dashboard_models

from alerts import dashboard_uids as uids
from alerts.build import (
    DASHBOARD_WINDOWS,
    RuleParams,
    dead_letter_ratio_record,
    duration_p95_record,
)
from dashboards.panels import (
    BY_DEPLOYMENT,
    DEPLOYMENT_LEGEND,
    FULL,
    HALF,
    QUARTER,
    RATE,
    SELECTOR,
    THIRD,
    dashboard_link,
    dashboard_url,
    datasource_variable,
    deployment_variables,
    heatmap_panel,
    query,
    series,
    stat_panel,
    table_panel,
    timeseries_panel,
)
from dashboards.params import DashboardParams
from jobs.model import JobStatus

TOP = 10
BY = BY_DEPLOYMENT
ATTEMPTS = "embedding_job_attempts_total"
# How long a scrape job counts as an embedding-jobs deployment after its exporters last served
# metrics: long enough that "Targets up" shows a job whose targets are all down as 0, not as nothing.
KNOWN_FOR = "1h"
COMPLETED = 'outcome="completed"'
DEAD_LETTERED = 'outcome="dead_lettered"'
DEAD_LETTER_QUEUE = 'state="dead_letter"'
BACKLOG = 'status=~"pending|processing|failed"'
TENANT_LEGEND = f"{{{{tenant}}}} {DEPLOYMENT_LEGEND}"
INSTANCE_LEGEND = f"{{{{instance}}}} {DEPLOYMENT_LEGEND}"


def overview(dashboard_params: DashboardParams) -> dashboard.Dashboard:
    """The overview dashboard; the rule parameters supply the SLO and recording-rule windows the alerts use."""
    params = dashboard_params.rules
    budget = float(params.error_budget)
    pages = " or ".join(f"{burn.factor:g} (over {burn.long} and {burn.short})" for burn in params.page_windows)
    window = DASHBOARD_WINDOWS[-1]
    return (
        dashboard.Dashboard("Embedding jobs — overview")
        .uid(uids.OVERVIEW)
        .description("Throughput, success, backlog and latency of embedding jobs across all tenants.")
        .tags(["embedding-jobs"])
        .time("now-6h", "now")
        .refresh("30s")
        .tooltip(dashboard_models.DashboardCursorSync.CROSSHAIR)
        .timezone("browser")
        .editable()
        .link(dashboard_link("Tenant drill-down", uids.TENANT, dashboard_params.grafana_url))
        .variables([datasource_variable(), *deployment_variables(dashboard_params.default_job)])
        .with_row(dashboard.Row("Throughput and success"))
        .with_panel(
            stat_panel(
                "Attempts / s",
                "Job attempts per second across all tenants and replicas.",
                [query(f"sum(rate({series(ATTEMPTS)}[{RATE}]))")],
                unit="ops",
                width=QUARTER,
            )
        )
        .with_panel(
            stat_panel(
                "Success ratio",
                "Share of attempts that completed (failed and dead-lettered attempts count against it).",
                [query(f"sum(rate({series(ATTEMPTS, COMPLETED)}[{RATE}]))\n/\nsum(rate({series(ATTEMPTS)}[{RATE}]))")],
                unit="percentunit",
                width=QUARTER,
            )
        )
        .with_panel(
            stat_panel(
                "Vectors / s",
                "Embedding vectors produced per second by completed attempts.",
                [query(f"sum(rate({series('embedding_vectors_total')}[{RATE}]))")],
                unit="short",
                width=QUARTER,
            )
        )
        .with_panel(
            stat_panel(
                "Dead-letter queue",
                "Messages waiting in the queues' dead-letter sub-queues, every selected deployment together.",
                [query(f"sum(max by ({BY}, queue) ({series('embedding_queue_messages', DEAD_LETTER_QUEUE)}))")],
                unit="short",
                width=QUARTER,
                thresholds=[(1, "red")],
            )
        )
        .with_panel(
            timeseries_panel(
                "Attempts by outcome",
                "Job attempts per second: completed, failed (a retry follows) and dead-lettered (given up).",
                [query(f"sum by (outcome) (rate({series(ATTEMPTS)}[{RATE}]))", "{{outcome}}")],
                unit="ops",
                stacked=True,
            )
        )
        .with_panel(
            timeseries_panel(
                "Success ratio by tenant",
                f"Share of completed attempts for the {TOP} tenants with the lowest ratio.",
                [
                    query(
                        f"bottomk({TOP},\n"
                        f"  sum by ({BY}, tenant) (rate({series(ATTEMPTS, COMPLETED)}[{RATE}]))\n"
                        f"  /\n  sum by ({BY}, tenant) (rate({series(ATTEMPTS)}[{RATE}]))\n)",
                        TENANT_LEGEND,
                    )
                ],
                unit="percentunit",
                max_value=1,
            )
        )
        .with_panel(
            timeseries_panel(
                "Error budget burn rate",
                f"How fast each tenant uses its error budget ({budget * 100:g}% of finished jobs may be dead-lettered) "
                f"over {window}; "
                f"1 uses it up exactly in the SLO period. The fast-burn alert pages above {pages}. "
                f"The {TOP} fastest-burning tenants.",
                [query(f"topk({TOP}, {dead_letter_ratio_record(window)}{{{SELECTOR}}} / {budget:g})", TENANT_LEGEND)],
                unit="short",
                thresholds=_burn_thresholds(params),
            )
        )
        .with_panel(
            timeseries_panel(
                "Vectors produced",
                f"Vectors per second for the {TOP} busiest tenants.",
                [
                    query(
                        f"topk({TOP}, sum by ({BY}, tenant) (rate({series('embedding_vectors_total')}[{RATE}])))",
                        TENANT_LEGEND,
                    )
                ],
                unit="short",
            )
        )
        .with_row(dashboard.Row("Jobs by tenant"))
        .with_panel(_status_table(dashboard_params.grafana_url))
        .with_panel(
            timeseries_panel(
                "Backlog",
                "Jobs waiting (pending), running (processing) and waiting for a retry (failed), all tenants.",
                [
                    query(
                        f"sum by (status) (\n  max by ({BY}, tenant, status) ({series('embedding_jobs', BACKLOG)})\n)",
                        "{{status}}",
                    )
                ],
                unit="short",
                stacked=True,
            )
        )
        .with_panel(
            timeseries_panel(
                "Stuck jobs",
                "Jobs pending or processing for longer than the exporter's stuck threshold (--stuck-after).",
                [
                    query(
                        f"topk({TOP}, max by ({BY}, tenant, status) ({series('embedding_jobs_stuck')}))",
                        f"{{{{tenant}}}} {{{{status}}}} {DEPLOYMENT_LEGEND}",
                    )
                ],
                unit="short",
                thresholds=[(1, "red")],
            )
        )
        .with_panel(
            timeseries_panel(
                "Oldest stuck job",
                "How long the longest-waiting stuck job has been pending or processing.",
                [
                    query(
                        f"topk({TOP}, max by ({BY}, tenant, status) "
                        f"({series('embedding_jobs_stuck_oldest_age_seconds')}))",
                        f"{{{{tenant}}}} {{{{status}}}} {DEPLOYMENT_LEGEND}",
                    )
                ],
                unit="s",
            )
        )
        .with_row(dashboard.Row("Latency"))
        .with_panel(
            timeseries_panel(
                "Attempt duration",
                "Percentiles of the duration of one attempt, all tenants and outcomes.",
                [_quantile(q, "embedding_job_duration_seconds_bucket") for q in (0.5, 0.95, 0.99)],
                unit="s",
                width=THIRD,
            )
        )
        .with_panel(
            timeseries_panel(
                "Queue wait",
                "Percentiles of the time from enqueue (or the scheduled retry time) to the start of an attempt.",
                [_quantile(q, "embedding_job_queue_wait_seconds_bucket") for q in (0.5, 0.95, 0.99)],
                unit="s",
                width=THIRD,
            )
        )
        .with_panel(
            timeseries_panel(
                "p95 attempt duration by tenant",
                f"95th percentile over {params.duration_window} (the recording rule the slow-jobs alert uses), "
                f"for the {TOP} slowest tenants.",
                [
                    query(
                        f"topk({TOP}, {duration_p95_record(params.duration_window)}{{{SELECTOR}}})",
                        TENANT_LEGEND,
                    )
                ],
                unit="s",
                width=THIRD,
                thresholds=[(params.duration_p95_seconds, "red")],
            )
        )
        .with_panel(
            heatmap_panel(
                "Attempt duration heatmap",
                "Attempts per duration bucket. Exemplars (points) link each bucket to the trace of one attempt.",
                query(
                    f"sum by (le) (increase({series('embedding_job_duration_seconds_bucket')}[{RATE}]))",
                    "{{le}}",
                    heatmap_format=True,
                    exemplar=True,
                ),
                unit="s",
                width=FULL,
            )
        )
        .with_row(dashboard.Row("Queue"))
        .with_panel(
            timeseries_panel(
                "Queue depth",
                "Messages by state: active (ready or locked by a worker), scheduled (a retry waiting for its "
                "backoff) and dead_letter.",
                [
                    query(
                        f"max by ({BY}, queue, state) ({series('embedding_queue_messages')})",
                        f"{{{{queue}}}} {{{{state}}}} {DEPLOYMENT_LEGEND}",
                    )
                ],
                unit="short",
            )
        )
        .with_panel(
            timeseries_panel(
                "Dead-lettered attempts",
                "Jobs given up per tenant: attempts used up, a permanent failure or an unreadable message.",
                [
                    query(
                        f"sum by ({BY}, tenant) (increase({series(ATTEMPTS, DEAD_LETTERED)}[{RATE}]))",
                        TENANT_LEGEND,
                    )
                ],
                unit="short",
                bars=True,
            )
        )
        .with_row(dashboard.Row("Exporter health"))
        .with_panel(
            stat_panel(
                "Targets up",
                "Exporter scrape targets Prometheus reaches, of all it knows in the scrape jobs that served "
                f"embedding-jobs metrics in the last {KNOWN_FOR}.",
                [query(f"sum({_exporter_targets()})", "up"), query(f"count({_exporter_targets()})", "known")],
                unit="short",
                height=8,
            )
        )
        .with_panel(
            stat_panel(
                "Tenants folded",
                'Tenants past the tenant label limit, counted together as tenant="__other__".',
                [query(f"sum(max by ({BY}) ({series('embedding_exporter_tenants_folded')}))")],
                unit="short",
                height=8,
                thresholds=[(1, "orange")],
            )
        )
        .with_panel(
            timeseries_panel(
                "Job gauge age",
                "Seconds since the state leader last read the job store: the state gauges are this old "
                "(a line per exporter that held the lease).",
                [
                    query(
                        f"time() - max by ({BY}, instance) "
                        f"({series('embedding_exporter_store_last_success_timestamp_seconds')})",
                        INSTANCE_LEGEND,
                    )
                ],
                unit="s",
                width=THIRD,
                thresholds=[(params.stale_after_seconds, "red")],
            )
        )
        .with_panel(
            timeseries_panel(
                "Store refresh duration",
                "95th percentile of the time the state leader takes to read the job store for state metrics.",
                [
                    query(
                        f"histogram_quantile(0.95,\n  sum by ({BY}, instance, le) "
                        f"(rate({series('embedding_exporter_store_refresh_duration_seconds_bucket')}[{RATE}]))\n)",
                        INSTANCE_LEGEND,
                    )
                ],
                unit="s",
                width=THIRD,
            )
        )
        .with_panel(
            timeseries_panel(
                "Store refresh errors",
                "Failed or timed-out reads of the job store per second, by exporter (only the state leader reads).",
                [
                    query(
                        f"sum by ({BY}, instance) "
                        f"(rate({series('embedding_exporter_store_refresh_errors_total')}[{RATE}]))",
                        INSTANCE_LEGEND,
                    )
                ],
                unit="ops",
                width=THIRD,
            )
        )
        .with_panel(
            timeseries_panel(
                "Queue depth age",
                "Seconds since the state leader last read the queue depth, per queue: the queue gauges are this "
                "old. Read apart from the job store, so one failing never ages the other's gauges.",
                [
                    query(
                        f"time() - max by ({BY}, instance, queue) "
                        f"({series('embedding_exporter_queue_depth_last_success_timestamp_seconds')})",
                        f"{{{{queue}}}} {INSTANCE_LEGEND}",
                    )
                ],
                unit="s",
                width=THIRD,
                thresholds=[(params.stale_after_seconds, "red")],
            )
        )
        .with_panel(
            timeseries_panel(
                "Queue depth read errors",
                "Failed or timed-out reads of the queue depth per second, by queue and exporter (only the state "
                "leader reads). The job store is not involved in these reads.",
                [
                    query(
                        f"sum by ({BY}, queue, instance) "
                        f"(rate({series('embedding_exporter_queue_depth_errors_total')}[{RATE}]))",
                        f"{{{{queue}}}} {INSTANCE_LEGEND}",
                    )
                ],
                unit="ops",
                width=THIRD,
            )
        )
        .with_panel(
            stat_panel(
                "State leader",
                "The exporter holding the state lease, the only one reading the job store for state metrics. "
                "Empty: no exporter holds it (EmbeddingExporterNoStateLeader).",
                [
                    query(
                        f"max by ({BY}, instance) ({series('embedding_exporter_state_leader')}) == 1",
                        INSTANCE_LEGEND,
                    )
                ],
                unit="none",
                width=THIRD,
                height=8,
            ).text_mode(common_models.BigValueTextMode.NAME)
        )
        .with_panel(
            timeseries_panel(
                "Spans",
                "Job spans turned into metrics per second, by source, and spans dropped, by reason.",
                [
                    query(
                        f"sum by (source) (rate({series('embedding_exporter_spans_received_total')}[{RATE}]))",
                        "received {{source}}",
                    ),
                    query(
                        f"sum by (reason) (rate({series('embedding_exporter_spans_dropped_total')}[{RATE}]))",
                        "dropped {{reason}}",
                    ),
                ],
                unit="ops",
                width=THIRD,
            )
        )
        .with_row(dashboard.Row("Worker tracking"))
        .with_panel(
            timeseries_panel(
                "Tracking writes buffered",
                "Job-status writes each worker holds (and spools under its data directory) while the job store "
                "does not answer; they replay once it does. Embedding goes on meanwhile.",
                [
                    query(
                        f"sum by ({BY}, worker) ({series('embedding_worker_tracking_buffered_writes')})",
                        f"{{{{worker}}}} {DEPLOYMENT_LEGEND}",
                    )
                ],
                unit="short",
                width=HALF,
            )
        )
        .with_panel(
            timeseries_panel(
                "Tracking writes: failures, replays and drops",
                "Per second, over all workers: job-store calls that failed or timed out, buffered writes replayed, "
                "writes adopted from a dead worker's spool, and writes dropped (EmbeddingWorkerTrackingWritesDropped; "
                "run `embedding-jobs recount` after one).",
                [
                    query(
                        f"sum by ({BY}) (rate({series(f'embedding_worker_tracking_{name}_total')}[{RATE}]))",
                        f"{label} {DEPLOYMENT_LEGEND}",
                    )
                    for name, label in (
                        ("store_failures", "store failures"),
                        ("replayed_writes", "replayed"),
                        ("adopted_writes", "adopted"),
                        ("dropped_writes", "dropped"),
                    )
                ],
                unit="ops",
                width=HALF,
            )
        )
    )


def _burn_thresholds(params: RuleParams) -> list[tuple[float, str]]:
    # Orange at the slower paging burn rate, red at the fastest.
    factors = sorted({burn.factor for burn in params.page_windows})
    return [(factor, "red" if factor == factors[-1] else "orange") for factor in factors]


def _quantile(q: float, bucket: str) -> prometheus.Dataquery:
    return query(f"histogram_quantile({q:g}, sum by (le) (rate({series(bucket)}[{RATE}])))", f"p{q * 100:g}")


def _exporter_targets() -> str:
    # `up` exists for every scrape target in Prometheus, so with job "All" (".*") it is kept to the
    # scrape jobs whose targets served embedding-jobs metrics lately; last_over_time skips the stale
    # markers a target leaves when it goes down, so a job with every target down still counts.
    return (
        f"up{{{SELECTOR}}} and on ({BY}) "
        f"group by ({BY}) (last_over_time({series('embedding_exporter_state_leader')}[{KNOWN_FOR}]))"
    )


def _status(status: str) -> str:
    return f'status="{status}"'


def _status_table(grafana_url: str) -> table.Panel:
    statuses = [status.value for status in JobStatus]
    letters = "ABCDEFGH"
    return table_panel(
        "Jobs per tenant and status",
        "Current job counts from the store, a row per tenant and deployment. Click a tenant for its "
        "drill-down dashboard.",
        [
            query(
                f"max by ({BY}, tenant) ({series('embedding_jobs', _status(status))})",
                instant=True,
                table_format=True,
            )
            for status in statuses
        ],
        transformations=[
            dashboard_models.DataTransformerConfig(id_val="merge", options={}),
            dashboard_models.DataTransformerConfig(
                id_val="organize",
                options={
                    "excludeByName": {"Time": True},
                    "renameByName": {f"Value #{letters[i]}": status for i, status in enumerate(statuses)},
                },
            ),
        ],
        width=HALF,
    ).override_by_name(
        "tenant",
        [
            dashboard_models.DynamicConfigValue(
                id_val="links",
                value=[
                    {
                        "title": "Open the tenant's dashboard",
                        # __all_variables carries the data source and the cluster, namespace and job selection.
                        "url": f"{dashboard_url(uids.TENANT, grafana_url)}?var-tenant=${{__value.raw}}"
                        "&${__all_variables}&${__url_time_range}",
                    }
                ],
            )
        ],
    )
